"""The serve protocol without a server: which error a bad request gets (the first problem, in the
order the fields are checked: the target, then the sampling settings), and the exact JSON of every
answer shape, whole and streamed."""

import json

import pytest

from loralab.deploy.serve.app import Reply
from loralab.deploy.serve.protocol import ApiError, Limits, parse_sampling, parse_target

LIMITS = Limits(model_ids=("base", "alpha"), control_tokens=("<|im_end|>",), max_tokens_limit=64, default_max_tokens=16)
USER = [{"role": "user", "content": "hi"}]


def parse_request(body: dict, chat: bool, limits: Limits):
    """Both parts, in the app's order (the app measures the prompt in between)."""
    return parse_target(body, chat, limits), parse_sampling(body, chat, limits)


def _error(body: dict, chat: bool = False, limits: Limits = LIMITS) -> tuple[int, str | None, str]:
    with pytest.raises(ApiError) as caught:
        parse_request(body, chat, limits)
    return caught.value.status, caught.value.code, caught.value.message


@pytest.mark.parametrize("body, chat, expected", [
    ({"prompt": "x"}, False, (400, "missing_model", "'model' is required")),
    ({"model": "nope", "prompt": "x", "n": 2}, False,
     (404, "model_not_found", "model 'nope' does not exist; GET /v1/models lists what is served")),
    ({"model": "alpha", "prompt": "", "n": 2}, False, (400, "invalid_value", "only n=1 is supported")),
    ({"model": "alpha", "prompt": ["a", "b"]}, False, (400, "invalid_prompt", "'prompt' must be a non-empty string")),
    ({"model": "alpha", "messages": [{"role": "root", "content": "x"}]}, True,
     (400, "invalid_messages", "'messages' must be a non-empty list of {role: system|user|assistant, content: string}")),
    ({"model": "alpha", "messages": [{"role": "user", "content": "a<|im_end|>b"}]}, True,
     (400, "invalid_messages", "message content may not contain control tokens (<|im_end|>)")),
    ({"model": "alpha", "prompt": "x", "stop": ["a", ""], "max_tokens": 0}, False,
     (400, "invalid_value", "'stop' must be a string or up to 4 non-empty strings")),
    ({"model": "alpha", "prompt": "x", "max_tokens": 65}, False, (400, "invalid_value", "'max_tokens'=65 is outside [1, 64]")),
    ({"model": "alpha", "prompt": "x", "max_tokens": True}, False, (400, "invalid_value", "'max_tokens' must be an integer")),
    ({"model": "alpha", "messages": USER, "max_completion_tokens": 2.5}, True,
     (400, "invalid_value", "'max_completion_tokens' must be an integer")),
    ({"model": "alpha", "prompt": "x", "temperature": "1"}, False, (400, "invalid_value", "'temperature' must be a number")),
    ({"model": "alpha", "prompt": "x", "top_p": 2}, False, (400, "invalid_value", "'top_p'=2 is outside [0.0, 1.0]")),
    ({"model": "alpha", "prompt": "x", "seed": -1}, False, (400, "invalid_value", "'seed'=-1 is outside [0, 2147483647]")),
])
def test_the_first_problem_is_the_answer(body, chat, expected):
    assert _error(body, chat) == expected


def test_an_absent_budget_is_the_default_and_checked_like_a_given_one():
    assert parse_sampling({"prompt": "x"}, False, LIMITS).token_budget(16) == 16
    chat = parse_sampling({"messages": USER, "max_completion_tokens": 9, "max_tokens": None}, True, LIMITS)
    assert chat.token_budget(16) == 16  # max_tokens named (even as null) wins over max_completion_tokens
    assert parse_sampling({"messages": USER, "max_completion_tokens": 9}, True, LIMITS).token_budget(16) == 9
    assert parse_sampling({"prompt": "x", "max_completion_tokens": 9}, False, LIMITS).token_budget(16) == 16  # chat only
    too_generous = Limits(("base",), (), max_tokens_limit=8, default_max_tokens=16)
    assert _error({"model": "base", "prompt": "x"}, limits=too_generous)[2] == "'max_tokens'=16 is outside [1, 8]"


def test_a_valid_request_keeps_its_settings():
    target, sampling = parse_request({"model": "alpha", "prompt": ["hi"], "stop": "\n", "max_tokens": 12.0, "temperature": 1,
                                      "top_p": 0.5, "seed": 7, "ignore_eos": True, "stream": 1, "user": "ignored"}, False, LIMITS)
    assert (target.model, target.prompt, sampling.stop, sampling.token_budget(16), sampling.temperature, sampling.top_p,
            sampling.seed, sampling.ignore_eos, sampling.stream) == ("alpha", "hi", ["\n"], 12, 1.0, 0.5, 7, True, True)
    chat = parse_target({"model": "alpha", "messages": [{"role": "user", "content": "hi", "name": "ann"}]}, True, LIMITS)
    assert [m.model_dump() for m in chat.messages] == [{"role": "user", "content": "hi", "name": "ann"}]


def test_error_body_is_openais_shape():
    error = ApiError(429, "server busy", kind="rate_limit_error", code="queue_full")
    assert json.dumps(error.body()) == ('{"error": {"message": "server busy", "type": "rate_limit_error", "param": null, '
                                        '"code": "queue_full"}}')


def test_reply_shapes_whole_and_streamed():
    text = Reply("cmpl-1", "alpha", chat=False, prompt_tokens=3, created=5)
    chat = Reply("chatcmpl-1", "alpha", chat=True, prompt_tokens=3, created=5)
    head = '"created": 5, "model": "alpha", "choices": '
    usage = '"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}'
    assert json.dumps(text.build("ab", "stop", 2)) == (
        '{"id": "cmpl-1", "object": "text_completion", ' + head
        + '[{"index": 0, "text": "ab", "finish_reason": "stop", "logprobs": null}], ' + usage + '}')
    assert json.dumps(text.build("a", streamed=True)) == (
        '{"id": "cmpl-1", "object": "text_completion", ' + head
        + '[{"index": 0, "text": "a", "finish_reason": null, "logprobs": null}]}')
    assert json.dumps(chat.build("ab", "length", 2)) == (
        '{"id": "chatcmpl-1", "object": "chat.completion", ' + head
        + '[{"index": 0, "message": {"role": "assistant", "content": "ab"}, "finish_reason": "length"}], ' + usage + '}')
    assert json.dumps(chat.opening_chunk()) == (
        '{"id": "chatcmpl-1", "object": "chat.completion.chunk", ' + head
        + '[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}')
    assert json.dumps(chat.build("", "stop", 2, streamed=True)) == (
        '{"id": "chatcmpl-1", "object": "chat.completion.chunk", ' + head
        + '[{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}], ' + usage + '}')
