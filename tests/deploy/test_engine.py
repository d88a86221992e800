"""The serving engine in-process on a tiny model with two adapters: requests join a running batch
at the next step without changing any answer, a long prompt's prefill is chunked so decoding rows
keep going, and /metrics' counters follow what happened."""

import threading
import time

import pytest
import torch

from loralab.deploy.serve.engine import Engine, Request


@pytest.fixture(scope="module")
def engine_parts(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model, config, adapter_name="alpha")
    model.add_adapter("beta", config)
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def _engine(engine_parts, **kwargs) -> Engine:
    model, tokenizer = engine_parts
    return Engine(model, tokenizer, ["alpha", "beta"], max_batch=8, max_queue=16, batch_wait_s=0.0, **kwargs).start()


class Answer:
    """Collects one request's events; `first_step` is the engine's decode-step count at its first event."""

    def __init__(self, engine: Engine):
        self.engine, self.text, self.finish, self.first_step = engine, [], None, None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if self.first_step is None:
            self.first_step = self.engine.stats["decode_steps"]
        assert event.error is None, event.error
        self.text.append(event.delta)
        if event.finish is not None:
            self.finish = event.finish
            self.done.set()

    def wait(self) -> str:
        assert self.done.wait(60)
        return "".join(self.text)


def _submit(engine: Engine, prompt_ids: list[int], adapter: str | None, max_tokens: int) -> Answer:
    answer = Answer(engine)
    engine.submit(Request(prompt_ids=prompt_ids, adapter=adapter, max_tokens=max_tokens, emit=answer, ignore_eos=True))
    return answer


def _prompt(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_requests_joining_a_running_batch_get_the_answers_they_get_alone(engine_parts):
    tokenizer = engine_parts[1]
    jobs = [(_prompt(tokenizer, f"Case {i}: the finding is" + " very" * (3 * i)), adapter, 6 + 5 * i)
            for i, adapter in enumerate(["alpha", "beta", None, "alpha", "beta", None])]
    engine = _engine(engine_parts)
    try:
        alone = [_submit(engine, *job).wait() for job in jobs]
        answers = []
        for job in jobs:  # staggered: each arrives while the earlier ones are decoding
            answers.append(_submit(engine, *job))
            time.sleep(0.02)
        together = [a.wait() for a in answers]
    finally:
        engine.stop()
    assert len(set(alone)) == len(alone)  # the adapters and prompts really differ
    assert together == alone
    assert engine.stats["max_batch_seen"] > 1  # rows with different adapters shared decode steps


def test_a_request_joins_at_the_next_step_and_leaves_when_done(engine_parts):
    tokenizer = engine_parts[1]
    engine = _engine(engine_parts)
    try:
        long = _submit(engine, _prompt(tokenizer, "A long answer"), "alpha", 200)
        while long.first_step is None:
            time.sleep(0.005)
        short = _submit(engine, _prompt(tokenizer, "A short answer"), "beta", 5)
        short.wait()
        assert not long.done.is_set()  # the short request did not wait for the long one to finish
        long.wait()
    finally:
        engine.stop()
    assert short.finish == long.finish == "length"


@pytest.mark.parametrize("chunk, interleaved", [(8, True), (4096, False)])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine_parts, chunk, interleaved):
    """With 8-token chunks, a 200-token prompt lets the decoding row step ~25 times before its
    first token; prefilled whole (the control), about once."""
    tokenizer = engine_parts[1]
    engine = _engine(engine_parts, prefill_chunk=chunk)
    try:
        decoding = _submit(engine, _prompt(tokenizer, "Keep talking"), None, 400)
        while decoding.first_step is None:
            time.sleep(0.005)
        long_prompt = (_prompt(tokenizer, " word") * 200)[:200]
        before = engine.stats["decode_steps"]
        reader = _submit(engine, long_prompt, "beta", 1)
        reader.wait()
        steps_during_prefill = reader.first_step - before
    finally:
        engine.stop()
    assert (steps_during_prefill >= 20) if interleaved else (steps_during_prefill <= 3)


def test_metrics_count_requests_tokens_and_time_to_first_token(engine_parts):
    tokenizer = engine_parts[1]
    engine = _engine(engine_parts)
    try:
        for adapter in ("alpha", None, "beta"):
            _submit(engine, _prompt(tokenizer, "Count to"), adapter, 7).wait()
        text = engine.metrics.render().decode()
    finally:
        engine.stop()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values['loralab_requests_total{finish="length"}'] == 3
    assert values["loralab_generated_tokens_total"] == 21
    assert values["loralab_prompt_tokens_total"] == 3 * len(_prompt(tokenizer, "Count to"))
    assert values["loralab_time_to_first_token_seconds_count"] == 3
    assert values["loralab_queue_depth"] == 0 and values["loralab_generated_tokens_per_second"] > 0
