"""Ray Serve: an OpenAI-compatible HTTP API in front of one PPSD pipeline per replica.

    serve run serve_config.yaml                  # a config file (see the repo root)
    ppsd serve --model DIR --stages 2            # a local Ray, blocks until SIGTERM / Ctrl-C

Each replica of the `PPSDServer` deployment is a FastAPI ingress that owns one
pipeline: K stage actors and a coordinator (actors/pipeline.py). The replica's
placement group holds one bundle for the replica itself (bundle 0, where the
coordinator also runs) and one per stage (bundles 1..K), reserved together
(PACK), so a replica starts only when all of its stages fit.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health. Decoding is greedy and lossless: the text is the model's own
greedy output. Request settings that would change it (temperature > 0,
top_p < 1, penalties, n > 1, stop strings, logprobs, ...) are refused with a
400 rather than ignored. See docs/serving.md.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' body types at runtime.
import asyncio
import hmac
import json
import os
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ppsd_ray.config import GenerationConfig, Mode, PipelineConfig, describe
from ppsd_ray.model import encode_prompt, load_tokenizer, resolve_model

API_KEY_ENV = "PPSD_API_KEY"


# ---------------------------------------------------------------- settings


class ServeSettings(BaseModel):
    """The application's arguments: `args:` in serve_config.yaml, or `ppsd serve` options."""
    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description="a named model ('default': SmolLM2-135M-Instruct, "
                                              "'gemma3-270m') or a model directory")
    stages: int = Field(2, ge=1, description="K, pipeline stages per replica")
    exit_layer: int | None = Field(None, description="E, the end of stage 1; default L/K")
    head: str = Field("auto", description="exit head: 'auto' (the shipped head, else lm), 'lm' or a trained head file")
    dtype: str = Field("auto", description="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    mode: Mode | None = Field(None, description="default: ppsd, or ar for one stage")
    model_name: str | None = Field(None, description="the id clients send as `model`; default: the directory name")
    api_key: str | None = Field(None, description=f"bearer token required on every endpoint; default: ${API_KEY_ENV}")
    max_tokens_limit: int = Field(2048, ge=1, description="the largest max_tokens a request may ask for")
    max_ongoing_requests: int = Field(8, ge=1, description="requests one replica decodes at once; more wait")
    use_gpus: bool | None = Field(None, description="one GPU per stage; default: if the cluster has K GPUs")
    cpus_per_stage: float = Field(0.1, gt=0, description="CPU reservation of a CPU stage")
    replica_cpus: float = Field(0.1, gt=0, description="CPU reservation of the replica (bundle 0)")

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(model_dir=resolve_model(self.model), stages=self.stages,
                              exit_layer=self.exit_layer, head=self.head, dtype=self.dtype,
                              cpus_per_stage=self.cpus_per_stage)

    def decoding_mode(self) -> Mode:
        return self.mode or (Mode.ppsd if self.stages > 1 else Mode.ar)

    def bundles(self, gpus: bool) -> list[dict]:
        """Bundle 0: the replica and its coordinator; bundle 1 + i: stage i."""
        stage = {"GPU": 1, "CPU": 1} if gpus else {"CPU": self.cpus_per_stage}
        return [{"CPU": self.replica_cpus}] + [dict(stage) for _ in range(self.stages)]


def check_settings(args: dict) -> ServeSettings:
    """The settings, checked against the model before anything starts; a ValueError names the field."""
    try:
        settings = ServeSettings(**(args or {}))
        settings.pipeline_config()  # a bad model, head or stage count fails here, before any replica
        if settings.mode is not None and settings.mode != Mode.ar and settings.stages < 2:
            raise ValueError(f"mode: {settings.mode.value} needs at least 2 stages")
        if settings.mode == Mode.ar and settings.stages != 1:
            raise ValueError("mode: ar runs on one stage")
    except ValidationError as e:
        raise ValueError(describe(e)) from None
    return settings


def build_app(args: dict) -> serve.Application:
    """Application builder: `import_path: actors.serve:build_app` with `args:` (ServeSettings)."""
    settings = check_settings(args)
    gpus = settings.use_gpus
    if gpus is None:
        gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= settings.stages
    return PPSDServer.options(
        placement_group_bundles=settings.bundles(gpus),
        placement_group_strategy="PACK",
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus},
    ).bind(settings.model_dump(mode="json"))


# ---------------------------------------------------------------- OpenAI request bodies


class _Body(BaseModel):
    # Unknown fields are refused (as OpenAI does), and JSON types are not coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields both endpoints take. Only values that keep decoding greedy are accepted."""
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None

    def refused(self) -> tuple[str, str] | None:
        """(param, message) of the first setting greedy decoding cannot honour."""
        if self.temperature not in (None, 0):
            return "temperature", "only greedy decoding is served: temperature must be 0 or absent"
        if self.top_p not in (None, 1):
            return "top_p", "only greedy decoding is served: top_p must be 1 or absent"
        if self.n not in (None, 1):
            return "n", "only one choice per request (n=1) is served"
        if self.stop:
            return "stop", "stop sequences are not supported; generation stops at EOS or max_tokens"
        if self.presence_penalty not in (None, 0):
            return "presence_penalty", "penalties are not supported (greedy decoding)"
        if self.frequency_penalty not in (None, 0):
            return "frequency_penalty", "penalties are not supported (greedy decoding)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported (greedy decoding)"
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refused(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of must be 1 (greedy decoding)"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().refused()


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def refused(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.top_logprobs:
            return "top_logprobs", "logprobs are not supported"
        return super().refused()


# ---------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _param(loc: tuple) -> str | None:
    # pydantic names the union member tried ('str', 'list[int]', 'ChatMessage') after the field
    keep = []
    for p in (str(p) for p in loc if p != "body"):
        if not (p.isdigit() or p.isidentifier()) or p in _TYPE_TAGS or p[:1].isupper():
            break
        keep.append(p)
    return ".".join(keep) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


app = FastAPI(title="ppsd-ray", description="OpenAI-compatible API over a PPSD pipeline",
              docs_url=None, redoc_url=None)
app.state.api_key = None


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: "
                             f"{first.get('ctx', {}).get('error', 'invalid JSON')}").response()
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = "; ".join(f"{_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return APIError(400, message, param=param).response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return APIError(exc.status_code, str(exc.detail), type="invalid_request_error"
                    if exc.status_code < 500 else "server_error").response()


@app.middleware("http")
async def _authenticate(request: Request, call_next):
    """With an API key configured, every path needs `Authorization: Bearer <key>`."""
    key = request.app.state.api_key
    if key:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                            code="invalid_api_key").response()
    return await call_next(request)


# ---------------------------------------------------------------- the deployment


@serve.deployment(max_ongoing_requests=8, health_check_period_s=10, health_check_timeout_s=60)
@serve.ingress(app)
class PPSDServer:
    def __init__(self, settings: dict):
        from actors.pipeline import Pipeline

        self.settings = ServeSettings(**settings)
        config = self.settings.pipeline_config()
        self.mode = self.settings.decoding_mode()
        self.tokenizer = load_tokenizer(config.model_dir)
        self.eos = frozenset(config.info.eos_token_ids)
        self.context = config.info.max_positions
        self.max_tokens_limit = min(self.settings.max_tokens_limit, self.context - 1)
        self.model_id = self.settings.model_name or Path(config.model_dir).name
        self.created = int(time.time())
        app.state.api_key = self.settings.api_key or os.environ.get(API_KEY_ENV) or None
        pg = ray.util.get_current_placement_group()  # the replica's own: bundle 0 is this actor
        self.pipe = Pipeline(config, pg=pg, first_bundle=1 if pg is not None else 0)
        self._submitter = ThreadPoolExecutor(1, thread_name_prefix="ppsd-submit")

    def __del__(self):  # Serve calls this when the replica shuts down
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            try:
                pipe.shutdown()
            except Exception:
                pass

    async def check_health(self) -> None:
        """Serve's replica health check: every stage actor answers."""
        await asyncio.gather(*[s.ready.remote() for s in self.pipe.stages])

    # -- endpoints

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, "stages": self.pipe.config.stages,
                "mode": self.mode.value, "layout": self.pipe.layout}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._model_card()

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        self._check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is served", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode_prompt(self.tokenizer, prompt, raw=True)
        else:
            ids = list(prompt)
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        max_tokens = self._max_tokens(body.max_tokens, "max_tokens", len(ids), "prompt")
        return await self._respond(body, ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        self._check_common(body)
        if not body.messages:
            raise APIError(400, "messages: must hold at least one message", param="messages")
        ids = self._encode_chat(body.messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self._max_tokens(requested, param, len(ids), "messages")
        return await self._respond(body, ids, max_tokens, chat=True)

    # -- request checks

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "ppsd-ray"}

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_id}`.",
                           param="model", code="model_not_found")

    def _check_common(self, body: _Sampling) -> None:
        self._check_model(body.model)
        refused = body.refused()
        if refused:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_value")

    def _encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        if len(messages) == 1 and messages[0].role == "user":  # exactly ppsd generate's prompt
            return encode_prompt(self.tokenizer, messages[0].text())
        if not self.tokenizer.chat_template:
            raise APIError(400, "the model has no chat template: send one user message", param="messages")
        try:
            ids = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in messages],
                add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the template refused the conversation (roles, order, ...)
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _max_tokens(self, requested: int | None, param: str, prompt_len: int, prompt_param: str) -> int:
        if prompt_len == 0:
            raise APIError(400, f"{prompt_param}: the prompt is empty", param=prompt_param)
        if prompt_len >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; "
                                f"the prompt has {prompt_len}.", param=prompt_param, code="context_length_exceeded")
        if requested is None:
            return min(self.max_tokens_limit, self.context - prompt_len)
        if requested < 1:
            raise APIError(400, f"{param}: {requested} is less than the minimum of 1", param=param,
                           code="invalid_value")
        if requested > self.max_tokens_limit:
            raise APIError(400, f"{param}: {requested} is greater than this server's limit of "
                                f"{self.max_tokens_limit}", param=param, code="invalid_value")
        if prompt_len + requested > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt "
                                f"({prompt_len}) plus {param} ({requested}) exceeds it.", param=param,
                           code="context_length_exceeded")
        return requested

    # -- generation

    async def _tokens(self, ids: list[int], max_tokens: int) -> AsyncIterator[int | dict]:
        """Token ids as the coordinator commits them, then its stats dict. Cancels the
        request in the coordinator when the caller stops early (a client disconnected)."""
        gen = GenerationConfig(mode=self.mode, max_new_tokens=max_tokens).model_dump(mode="json")
        seq_id = uuid.uuid4().hex
        coordinator = self.pipe.coordinator
        refs = await self._submit(coordinator.generate.remote, seq_id, ids, gen)
        done = False
        try:
            async for ref in refs:
                item = await ref
                if isinstance(item, dict):
                    done = True
                yield item
        finally:
            if not done:  # the client went away: stop decoding after the next token
                await self._submit(coordinator.cancel.remote, seq_id)

    async def _submit(self, method, *args):
        """Calls method.remote(*args) from a thread of our own, so that the call is not a
        child of the request's Ray task. When a client disconnects, Serve cancels that task
        with ray.cancel(recursive=True), which would also cancel the coordinator's queued
        calls to the stages; Ray 2.60 then leaves a gap in the stage actor's call sequence
        and the next request on that stage stalls for 30 s and fails."""
        return await asyncio.get_running_loop().run_in_executor(self._submitter, method, *args)

    def _finish(self, tokens: list[int]) -> str:
        """OpenAI's finish_reason: "stop" at EOS, else the max_tokens limit ended it."""
        return "stop" if tokens and tokens[-1] in self.eos else "length"

    @staticmethod
    def _usage(prompt_len: int, completion: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": completion,
                "total_tokens": prompt_len + completion}

    def _ppsd(self, stats: dict) -> dict:
        return {"mode": self.mode.value, "stages": self.pipe.config.stages,
                "drafted": stats.get("drafted", 0), "accepted": stats.get("accepted", 0),
                "acceptance_rate": stats.get("acceptance_rate", 0.0), "rollbacks": stats.get("rollbacks", 0),
                "tokens_per_s": stats.get("tokens_per_s", 0.0)}

    async def _respond(self, body: _Sampling, ids: list[int], max_tokens: int, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(rid, created, ids, max_tokens, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        tokens, stats = [], {}
        try:
            async for item in self._tokens(ids, max_tokens):
                if isinstance(item, dict):
                    stats = item
                else:
                    tokens.append(item)
        except Exception as e:
            raise APIError(500, f"generation failed: {e}", type="server_error") from None
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        finish = self._finish(tokens)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.model_id, "choices": [choice], "usage": self._usage(len(ids), len(tokens)),
                "ppsd": self._ppsd(stats)}

    async def _sse(self, rid: str, created: int, ids: list[int], max_tokens: int, chat: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, role: bool = False, **extra) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            data = {"id": rid, "object": obj, "created": created, "model": self.model_id,
                    "choices": [choice], **extra}
            if include_usage:
                data.setdefault("usage", None)
            return f"data: {json.dumps(data)}\n\n"

        if chat:
            yield chunk("", role=True)
        tokens, shown, stats = [], "", {}
        try:
            async for item in self._tokens(ids, max_tokens):
                if isinstance(item, dict):
                    stats = item
                    continue
                tokens.append(item)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
                    continue
                if len(text) > len(shown):
                    yield chunk(text[len(shown):])
                    shown = text
        except Exception as e:
            err = APIError(500, f"generation failed: {e}", type="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        tail = text[len(shown):] if len(text) > len(shown) else None
        yield chunk(tail, finish=self._finish(tokens), ppsd=self._ppsd(stats))
        if include_usage:
            data = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [],
                    "usage": self._usage(len(ids), len(tokens))}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- `ppsd serve`


class _Stop(BaseException):
    pass


def serve_forever(settings: dict, host: str = "127.0.0.1", port: int = 8000,
                  metrics_port: int | None = None, address: str | None = None) -> int:
    """Starts a new local Ray (or joins `address`), deploys the application, blocks until
    SIGTERM or Ctrl-C, then shuts down Serve and the Ray processes it started (on a
    joined cluster: deletes only this application). Returns the exit code."""
    own = address is None
    init: dict[str, Any] = {"address": "local" if own else address, "configure_logging": False}
    if own:  # never join a cluster some other `ray start` left on this machine by accident
        init["include_dashboard"] = False
        if metrics_port:
            init["_metrics_export_port"] = metrics_port
    ray.init(**init)

    def stop(signum, frame):
        raise _Stop(signum)

    try:
        # ray.init installed a SIGTERM handler that exits at once; ours unwinds through finally
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(settings), name="ppsd", route_prefix="/", blocking=False)
        node = ray._private.worker.global_worker.node
        print(f"ppsd serve: ready on http://{host}:{port}/v1 (model {settings.get('model')}, "
              f"{settings.get('stages')} stages); Prometheus metrics on "
              f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except (_Stop, KeyboardInterrupt):
        print("ppsd serve: shutting down", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if own:
                serve.shutdown()
            else:
                serve.delete("ppsd")
        finally:
            ray.shutdown()
    return 0
