"""The method registry is data: one record per `lora.method`, each consistent with itself, and the
only place that knows a method's quirks (no model is loaded here)."""

from __future__ import annotations

import typing

import pytest

from loralab.adapters.method import Method
from loralab.adapters.methods import METHOD_NAMES, METHOD_OPTIONS, METHODS, REGISTRY, get_method, run_overrides, validate
from loralab.config import LoraSettings
from loralab.util.errors import LoralabError


def test_registry_names_are_in_order_and_match_the_descriptions():
    assert METHOD_NAMES == ("lora", "rslora", "dora", "pissa", "olora", "loraplus", "adalora", "ia3", "full")
    assert list(METHODS) == list(METHOD_NAMES) == [m.name for m in REGISTRY.values()]
    assert all(METHODS[name] == get_method(name).description for name in METHOD_NAMES)


def test_config_method_literal_lists_the_registry():
    """config (layer 1) cannot import adapters (layer 2), so it writes the Literal by hand: keep the two equal."""
    annotation = typing.get_type_hints(LoraSettings)["method"]
    if typing.get_origin(annotation) is not typing.Literal:
        pytest.skip(f"lora.method is still annotated {annotation!r}, not a Literal")
    assert typing.get_args(annotation) == METHOD_NAMES


def test_unknown_method_names_the_key_and_the_choices():
    with pytest.raises(LoralabError, match=r"^lora.method='superlora': expected one of lora, rslora, .*, full$"):
        get_method("superlora")


def test_records_say_what_the_training_code_asks():
    changes_base = {n for n in METHOD_NAMES if get_method(n).changes_base}
    assert changes_base == {"pissa", "olora", "full"}
    assert {n for n in METHOD_NAMES if not get_method(n).exact_resume} == {"adalora"}
    assert {n for n in METHOD_NAMES if get_method(n).whole_model} == {"full"}
    assert {n for n in METHOD_NAMES if get_method(n).keeps_initial_adapter} == {"pissa", "olora"}
    assert {n for n in METHOD_NAMES if not get_method(n).has_rank} == {"ia3", "full"}
    assert {n: get_method(n).min_steps for n in METHOD_NAMES if get_method(n).min_steps > 1} == {"adalora": 5}
    assert get_method("full").peft_config is None
    assert all(get_method(n).peft_config is not None for n in METHOD_NAMES if n != "full")


def test_each_option_belongs_to_one_method():
    assert METHOD_OPTIONS == ("loraplus_lr_ratio", "adalora_init_r")
    assert get_method("loraplus").options == ("loraplus_lr_ratio",)
    assert get_method("adalora").options == ("adalora_init_r",)
    for option in METHOD_OPTIONS:
        assert hasattr(LoraSettings(), option)


def test_a_whole_model_method_has_no_peft_config_and_every_other_has_one():
    with pytest.raises(ValueError, match="whole-model"):
        Method("broken", "a whole model with an adapter", lambda *a: None, whole_model=True)
    with pytest.raises(ValueError, match="whole-model"):
        Method("broken", "an adapter without a config", None)


def test_run_overrides_clear_other_methods_options_and_set_fixed_ones():
    settings = LoraSettings(loraplus_lr_ratio=8.0, adalora_init_r=12)
    assert run_overrides("lora", settings) == ({"lora.loraplus_lr_ratio": None, "lora.adalora_init_r": None}, {})
    assert run_overrides("loraplus", settings) == ({"lora.adalora_init_r": None}, {})
    assert run_overrides("adalora", settings) == ({"lora.loraplus_lr_ratio": None}, {})
    assert run_overrides("ia3", LoraSettings()) == ({}, {"lora.target_modules": "auto"})
    assert run_overrides("superlora", settings) == ({}, {})  # validate names it, with the caller's context


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_accepts_its_own_defaults_after_its_overrides(name):
    settings = LoraSettings(method=name, loraplus_lr_ratio=4.0, adalora_init_r=16,
                            target_modules=["q_proj"])
    cleared, fixed = run_overrides(name, settings)
    for key, value in {**cleared, **fixed}.items():
        setattr(settings, key.removeprefix("lora."), value)
    if name != "full":  # full fine-tuning ignores target_modules; everything else keeps them unless fixed
        assert settings.target_modules == ("auto" if fixed else ["q_proj"])
    validate(settings)
