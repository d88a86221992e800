"""CPU classes decide the code path (bf16 autocast only with native bf16) and label every benchmark."""

from loralab.util.cpu import CPU_CLASSES, FLAGS_OF_INTEREST, cpu_class, cpu_profile


def test_class_follows_the_strongest_flag():
    assert cpu_class({"avx2", "avx512f", "avx512_bf16"}) == "avx512-bf16"
    assert cpu_class({"avx2", "amx_bf16", "amx_tile"}) == "avx512-bf16"
    assert cpu_class({"avx2", "avx512f"}) == "avx512"
    assert cpu_class({"avx2", "fma"}) == "avx2"
    assert cpu_class({"sse4_2"}) == "baseline"


def test_profile_records_every_flag_of_interest_and_agrees_with_its_class():
    profile = cpu_profile()
    assert set(profile["flags"]) == set(FLAGS_OF_INTEREST)
    assert profile["class"] in CPU_CLASSES
    assert profile["class"] == cpu_class({f for f, present in profile["flags"].items() if present})
