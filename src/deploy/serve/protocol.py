"""The wire format of `loralab serve`: OpenAI's request and response shapes as pydantic models, its
error shape, and `Event`, the one message type the engine thread sends the app about a request.

A request is read in two parts, in the order its problems are reported: the target (model, n, then
the prompt or the messages), then, once the app has tokenized the prompt and checked its length,
the sampling settings. Within each part the fields are checked in declaration order and the first
failure is the answer, so a request with several problems always gets the same one. Every check
raises a `PydanticCustomError` whose type is OpenAI's error code; `ApiError.from_validation` turns
it into the HTTP error (404 for an unknown model, 400 otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An answer other than 200, in OpenAI's shape {"error": {message, type, param, code}}."""

    STATUS_BY_CODE = {"model_not_found": 404}  # every other request check is a 400

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    @classmethod
    def from_validation(cls, exc: ValidationError) -> ApiError:
        first = exc.errors()[0]
        return cls(cls.STATUS_BY_CODE.get(first["type"], 400), first["msg"], code=first["type"])

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.kind, code=self.code)).model_dump()


@dataclass(frozen=True)
class Event:
    """What the engine thread tells the app about one request: a piece of text, or its end (why it
    stopped and how many tokens it made), or the error that failed its batch."""

    delta: str = ""
    finish: str | None = None  # "stop", "length" or "cancelled": the request's last event
    completion_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Limits:
    """What a request is checked against (given as the validation context: `context={"limits": ...}`)."""

    model_ids: tuple[str, ...]  # the base model's id, then the adapters'
    control_tokens: tuple[str, ...]  # the tokenizer's special tokens, which message content may not contain
    max_tokens_limit: int
    default_max_tokens: int


def _fail(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, message)


def _limits(info: ValidationInfo) -> Limits:
    return info.context["limits"]


def _number(value: Any, key: str, low: float, high: float, integer: bool = False) -> int | float | None:
    """JSON numbers only (a bool is not one); None means "the default"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise _fail("invalid_value", f"'{key}' must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise _fail("invalid_value", f"'{key}'={value} is outside [{low}, {high}]")
    return int(value) if integer else float(value)


def _required(default: Any = None) -> Any:
    return Field(default, validate_default=True)  # absent fields are checked too ("'model' is required")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name": passed on to the chat template untouched

    role: Literal["system", "user", "assistant"]
    content: str


class _Target(BaseModel):
    """What to continue: the model id, one choice, then (in each route's subclass) the prompt."""

    model_config = ConfigDict(extra="ignore")  # the sampling fields, and fields this server does not use

    model: str = _required()
    n: int = 1

    @field_validator("model", mode="before")
    @classmethod
    def _served_model(cls, value: Any, info: ValidationInfo) -> str:
        if not isinstance(value, str):
            raise _fail("missing_model", "'model' is required")
        if value not in _limits(info).model_ids:
            raise _fail("model_not_found", f"model '{value}' does not exist; GET /v1/models lists what is served")
        return value

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, value: Any) -> int:
        if value != 1:
            raise _fail("invalid_value", "only n=1 is supported")
        return 1


class CompletionTarget(_Target):
    """POST /v1/completions: a prompt string (or a list holding one)."""

    prompt: str = _required()

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str) or not value:
            raise _fail("invalid_prompt", "'prompt' must be a non-empty string")
        return value


class ChatTarget(_Target):
    """POST /v1/chat/completions: the conversation so far."""

    messages: list[ChatMessage] = _required()

    @field_validator("messages", mode="before")
    @classmethod
    def _turns(cls, value: Any, info: ValidationInfo) -> list:
        if not isinstance(value, list) or not value or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
            raise _fail("invalid_messages",
                        "'messages' must be a non-empty list of {role: system|user|assistant, content: string}")
        controls = [t for t in _limits(info).control_tokens if any(t in m["content"] for m in value)]
        if controls:  # otherwise a client could forge turns, e.g. a system prompt, inside its content
            raise _fail("invalid_messages", f"message content may not contain control tokens ({', '.join(controls)})")
        return value


class Sampling(BaseModel):
    """How to decode, for /v1/completions. Checked after the prompt has been measured, so an
    over-long prompt is reported before a bad setting."""

    model_config = ConfigDict(extra="ignore")
    CHAT: ClassVar[bool] = False

    stop: list[str] = []
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # chat only: OpenAI's newer name, which counts when max_tokens is absent
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always produce max_tokens (as vLLM's extension of the API)
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: Any, info: ValidationInfo) -> Any:
        """The one budget field that counts; when none is given, the server's default, checked like a given one."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        key = "max_tokens" if "max_tokens" in data or not cls.CHAT else "max_completion_tokens"
        data.pop("max_completion_tokens" if key == "max_tokens" else "max_tokens", None)
        data.setdefault(key, _limits(info).default_max_tokens)
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        stop = value or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > MAX_STOP_STRINGS:
            raise _fail("invalid_value", f"'stop' must be a string or up to {MAX_STOP_STRINGS} non-empty strings")
        return stop

    @field_validator("max_tokens", "max_completion_tokens", mode="before")
    @classmethod
    def _token_budget(cls, value: Any, info: ValidationInfo) -> int | None:
        return _number(value, info.field_name, 1, _limits(info).max_tokens_limit, integer=True)

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value: Any) -> float:
        number = _number(value, "temperature", 0.0, 2.0)
        return 0.0 if number is None else number

    @field_validator("top_p", mode="before")
    @classmethod
    def _top_p(cls, value: Any) -> float:
        number = _number(value, "top_p", 0.0, 1.0)
        return 1.0 if number is None else number

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int | None:
        return _number(value, "seed", 0, 2**31 - 1, integer=True)

    @field_validator("ignore_eos", mode="before")
    @classmethod
    def _only_true(cls, value: Any) -> bool:
        return value is True

    @field_validator("stream", mode="before")
    @classmethod
    def _truthy(cls, value: Any) -> bool:
        return bool(value)

    def token_budget(self, default: int) -> int:
        """A budget given as null means the default, unchecked (as it always has)."""
        given = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        return default if given is None else given


class ChatSampling(Sampling):
    """How to decode, for /v1/chat/completions."""

    CHAT: ClassVar[bool] = True


def _parse(model: type[BaseModel], body: dict, limits: Limits):
    try:
        return model.model_validate(body, context={"limits": limits})
    except ValidationError as exc:
        raise ApiError.from_validation(exc) from None


def parse_target(body: dict, chat: bool, limits: Limits) -> CompletionTarget | ChatTarget:
    """The model and prompt of either route, or the `ApiError` for the first problem with them."""
    return _parse(ChatTarget if chat else CompletionTarget, body, limits)


def parse_sampling(body: dict, chat: bool, limits: Limits) -> Sampling:
    """The decoding settings of either route, or the `ApiError` for the first problem with them."""
    return _parse(ChatSampling if chat else Sampling, body, limits)


# --- responses ----------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None  # only in a chat stream's first chunk
    content: str

    @model_serializer(mode="wrap")
    def _without_absent_role(self, handler) -> dict:
        data = handler(self)
        if data["role"] is None:
            del data["role"]
        return data


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None


class Completion(BaseModel):
    """A whole answer, or one server-sent event of a streamed one (the last chunk carries the usage)."""

    id: str
    object: Literal["text_completion", "chat.completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[TextChoice | ChatChoice | ChunkChoice]
    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _without_absent_usage(self, handler) -> dict:
        data = handler(self)
        if data["usage"] is None:
            del data["usage"]
        return data


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "loralab"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamErrorDetail(BaseModel):
    message: str
    type: str


class StreamError(BaseModel):
    """An error inside a stream that already answered 200: the last event before the stream ends."""

    error: StreamErrorDetail
