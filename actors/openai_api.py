"""The OpenAI API as this server speaks it: request bodies, response bodies, errors.

No Ray and no model here (actors/openai_serving.py answers requests, actors/serve.py
serves them). Requests: OpenAI's fields, strictly typed (no JSON type coercion); an
unknown field is refused as OpenAI refuses it; fields that cannot change the output
are accepted and ignored; a setting this server cannot honour is a 400 naming it
rather than a silently different answer.
"""
# No `from __future__ import annotations`: FastAPI reads the body types at runtime.
import json
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ppsd_ray.config import Logprobs, Seed, Temperature, TopP

MAX_STOP = 4


# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": {k: _printable(v) for k, v in error.items()}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _printable(v: str | None) -> str | None:
    # a lone surrogate echoed from the request (an unknown key) cannot be encoded as UTF-8
    return v.encode("utf-8", "backslashreplace").decode() if isinstance(v, str) else v


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_value")


def install_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's and Starlette's included, leaves with OpenAI's body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail),
                        type="invalid_request_error" if exc.status_code < 500 else "server_error").response()


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's request validation errors as one 400 naming the first bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: "
                             f"{first.get('ctx', {}).get('error', 'invalid JSON')}")
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param is None:
        return APIError(400, "The request has no body: send a JSON object.")
    if first.get("type") in ("model_type", "model_attributes_type", "dict_type") and param is None:
        return APIError(400, "The request body must be a JSON object.")
    if first.get("type") == "extra_forbidden":  # the key as sent, even one that is not an identifier
        name = ".".join(str(p) for p in first["loc"] if p != "body")
        return APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    message = "; ".join(f"{_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}".removesuffix(".")
                        .replace("Value error, ", "") for e in errors[:5])
    return APIError(400, message, param=param)


def _param(loc: tuple) -> str | None:
    # pydantic names the union member tried ('str', 'list[int]', 'ChatMessage') after the field
    keep = []
    for p in (str(p) for p in loc if p != "body"):
        if not (p.isdigit() or p.isidentifier()) or p in _TYPE_TAGS or p[:1].isupper():
            break
        keep.append(p)
    return ".".join(keep) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


# ---------------------------------------------------------------- requests


def _lone_surrogate(v: Any) -> bool:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(v, (list, tuple)):
        return any(_lone_surrogate(x) for x in v)
    if isinstance(v, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(x) for k, x in v.items())
    return False  # numbers, and nested bodies, which check their own fields


class _Body(BaseModel):
    # Unknown fields are refused (as OpenAI does), and JSON types are not coerced.
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, v):
        if _lone_surrogate(v):  # JSON allows "\ud800"; no tokenizer or UTF-8 encoder does
            raise ValueError("contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid Unicode")
        return v


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: nothing is padded here


StopString = Annotated[str, Field(min_length=1)]


class RequestBase(_Body):
    """Fields both endpoints take."""
    model: str | None = Field(None, description="may be omitted: one model is served")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = Field(None, description="absent: 0, greedy (OpenAI's default is 1)")
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = Field(None, description="vLLM's extra field; -1 or 0: off")
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # accepted and ignored: they do not change the output
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> dict:
        """The GenerationConfig fields this request sets."""
        chosen = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                  "top_k": None if self.top_k is None else max(self.top_k, 0)}
        return {k: v for k, v in chosen.items() if v is not None}

    def refused(self) -> APIError | None:
        """The first setting this server cannot honour."""
        if self.n not in (None, 1):
            return unsupported("n", "only one choice per request (n=1) is served")
        if self.presence_penalty not in (None, 0):
            return unsupported("presence_penalty", "penalties are not supported")
        if self.frequency_penalty not in (None, 0):
            return unsupported("frequency_penalty", "penalties are not supported")
        if self.logit_bias:
            return unsupported("logit_bias", "logit_bias is not supported")
        return None


class CompletionRequest(RequestBase):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: Logprobs | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refused(self) -> APIError | None:
        if self.echo:
            return unsupported("echo", "echo is not supported")
        if self.best_of not in (None, 1):
            return unsupported("best_of", "best_of must be 1")
        if self.suffix:
            return unsupported("suffix", "suffix is not supported")
        return super().refused()


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # ignored: chat templates do not use it

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class ChatCompletionRequest(RequestBase):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: Logprobs | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # ignored: no tools are called

    def logprobs_count(self) -> int | None:
        """GenerationConfig.logprobs: None, or the number of top alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def refused(self) -> APIError | None:
        if self.top_logprobs is not None and not self.logprobs:
            return APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
        if self.tools:
            return unsupported("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            return unsupported("tool_choice", "tool calling is not supported")
        if self.response_format and self.response_format.type != "text":
            return unsupported("response_format", f"response_format {self.response_format.type} is not "
                                                  "supported: only text")
        return super().refused()


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PPSDStats(BaseModel):
    """The request's speculation: the one field OpenAI does not have."""
    mode: str
    stages: int
    drafted: int
    accepted: int
    acceptance_rate: float
    rollbacks: int
    tokens_per_s: float
    head_version: int | None = None  # the exit head version that drafted it (online learning: docs/heads.md)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


FinishReason = Literal["stop", "length"]


def _omit_none():
    return Field(None, exclude_if=lambda v: v is None)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class Delta(BaseModel):
    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class _Response(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage | None = _omit_none()
    ppsd: PPSDStats | None = _omit_none()


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


def sse(event: BaseModel | dict | str) -> str:
    """One server-sent event: a model or dict as JSON, or a literal like [DONE]."""
    if isinstance(event, BaseModel):
        event = event.model_dump_json()
    elif isinstance(event, dict):
        event = json.dumps(event)
    return f"data: {event}\n\n"
