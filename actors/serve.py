"""Ray Serve: an OpenAI-compatible HTTP API in front of one PPSD pipeline per replica.

    serve run serve_config.yaml                  # a config file (see the repo root)
    ppsd serve --model DIR --stages 2            # a local Ray, blocks until SIGTERM / Ctrl-C

Each replica of the `PPSDServer` deployment is a FastAPI ingress that owns one
pipeline: K stage actors and a coordinator (actors/pipeline.py). The replica's
placement group holds one bundle for the replica itself (bundle 0, where the
coordinator also runs) and one per stage (bundles 1..K), reserved together
(PACK), so a replica starts only when all of its stages fit.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health. The requests and responses are in actors/openai_api.py, how they
are answered in actors/openai_serving.py. See docs/serving.md.

Nothing waits forever: every wait on the coordinator has a deadline (timeout_s,
health_check_timeout_s), and Serve's health check decodes a token through the
whole pipeline, so a replica whose coordinator or stages broke is replaced.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' body types at runtime.
import asyncio
import hmac
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator

import ray
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve

from ppsd_ray.cluster import start_ray
from ppsd_ray.config import GenerationConfig, Mode, PipelineConfig, describe
from ppsd_ray.model import encode_prompt, load_tokenizer
from ppsd_ray.plan import resolve
from ppsd_ray.schedule import TokenLogprobs

from .coordinator import Failed, Health
from .openai_api import APIError, ChatCompletionRequest, CompletionRequest, install_error_handlers
from .openai_serving import OpenAIServing
from .pipeline import Pipeline, check_learning

API_KEY_ENV = "PPSD_API_KEY"
PROBE_PROMPT = "Hello"  # the health probe decodes one greedy token of it


# ---------------------------------------------------------------- settings


SERVE_CONCURRENCY = 8  # a server expects several clients at once: planned for 1, its stages run rows
                       # one by one (kv.one_row_tiling), 2.5x the batched kernel's cost at 16 rows


class ServeSettings(BaseModel):
    """The application's arguments: `args:` in serve_config.yaml, or `ppsd serve` options."""
    model_config = ConfigDict(extra="forbid")

    pipeline: PipelineConfig = Field(default_factory=lambda: PipelineConfig(model_dir="default"),
                                     description="the pipeline each replica builds (model_dir, stages, ...)")
    mode: Mode | None = Field(None, description="default (auto): of the modes the configured stages run, the one "
                                                "predicted fastest (one stage: ar)")
    model_name: str | None = Field(None, description="the id clients send as `model`; default: the directory name")
    api_key: str | None = Field(None, description=f"bearer token required on every endpoint; default: ${API_KEY_ENV}")
    require_api_key: bool = Field(False, description="a replica without a key refuses to start; set by "
                                                     "build_app when it sees a key")
    max_tokens_limit: int = Field(2048, ge=1, description="the largest max_tokens a request may ask for")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica takes at once: up to "
                                                            "pipeline.max_num_seqs decode, batched, the rest wait "
                                                            "in the replica for a slot")
    max_queued_requests: int = Field(64, ge=0, description="requests waiting for a replica beyond those; more "
                                                           "are refused at once with 503")
    replica_cpus: float = Field(0.1, gt=0, description="CPU reservation of the replica (bundle 0)")
    timeout_s: float = Field(150.0, gt=0, description="longest a request waits for the pipeline's next token "
                                                      "(or any call to the coordinator), then a 504 naming it; "
                                                      "above pipeline.timeout_s so that a stage the pipeline "
                                                      "gives up on is named first")
    health_check_period_s: float = Field(10.0, gt=0, description="how often Serve probes each replica: one "
                                                                 "token decoded through every stage")
    health_check_timeout_s: float = Field(30.0, gt=0, description="the probe's deadline; after three failed "
                                                                  "probes in a row Serve replaces the replica")

    @model_validator(mode="after")
    def _plans_for_load(self) -> "ServeSettings":
        """Unless told, a replica plans (mode, K, the stages' kernels) for SERVE_CONCURRENCY clients."""
        if "concurrency" not in self.pipeline.model_fields_set:
            self.pipeline = self.pipeline.model_copy(
                update={"concurrency": min(SERVE_CONCURRENCY, self.pipeline.max_num_seqs)})
        return self

    @model_validator(mode="after")
    def _mode_fits_stages(self) -> "ServeSettings":
        stages = self.pipeline.stages
        if self.mode not in (None, Mode.auto, Mode.ar) and stages < 2:
            raise ValueError(f"mode: {self.mode.value} needs at least 2 stages")
        if self.mode == Mode.ar and stages != 1:
            raise ValueError("mode: ar runs on one stage")
        return self

    def key(self) -> str | None:
        """The API key: the setting, else $PPSD_API_KEY where this runs."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def replica_key(self) -> str | None:
        """The key a replica serves with; a RuntimeError where one is required and none reached it."""
        key = self.key()
        if self.require_api_key and not key:
            raise RuntimeError(f"an API key was configured where the application was built, but this replica "
                               f"has none: set {API_KEY_ENV} in the application's runtime_env.env_vars (or in "
                               f"the environment of `ray start`). Refusing to serve without it.")
        return key

    def bundles(self, gpus: bool) -> list[dict]:
        """Bundle 0: the replica and its coordinator; bundle 1 + i: stage i."""
        stage = {"GPU": 1, "CPU": 1} if gpus else {"CPU": self.pipeline.cpus_per_stage}
        return [{"CPU": self.replica_cpus}] + [dict(stage) for _ in range(self.pipeline.stages)]


def check_settings(args: dict) -> ServeSettings:
    """The settings, checked against the model before anything starts; a ValueError names the field.
    What 'auto' resolves to here is checked too (each replica resolves its pipeline again)."""
    try:
        settings = ServeSettings(**(args or {}))
    except ValidationError as e:
        raise ValueError(describe(e)) from None
    try:
        check_learning(settings.pipeline, resolve(settings.pipeline, settings.mode))
    except ValueError as e:
        raise ValueError(f"pipeline.{e}") from None
    return settings


def build_app(args: dict) -> serve.Application:
    """Application builder: `import_path: actors.serve:build_app` with `args:` (ServeSettings).
    A key seen here (setting or $PPSD_API_KEY) must reach every replica: one that finds
    none refuses to start, so the server never runs open by accident."""
    settings = check_settings(args)
    if settings.key():
        settings = settings.model_copy(update={"require_api_key": True})
    # the plan is made once, here, and every replica builds it: with mode auto and no stages
    # given, the K it chose (the bundles below are reserved for it)
    plan = resolve(settings.pipeline, settings.mode)
    settings = settings.model_copy(update={"mode": plan.mode,
                                           "pipeline": settings.pipeline.model_copy(update={"stages": plan.stages})})
    gpus = settings.pipeline.use_gpus
    if gpus is None:
        gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= settings.pipeline.stages
    return PPSDServer.options(
        placement_group_bundles=settings.bundles(gpus),
        placement_group_strategy="PACK",
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        health_check_period_s=settings.health_check_period_s,
        # Serve's own deadline, a little later than ours, so that the failure logged is ours (it names what failed)
        health_check_timeout_s=settings.health_check_timeout_s + 5,
        ray_actor_options={"num_cpus": settings.replica_cpus},
    ).bind(settings.model_dump(mode="json"))


# ---------------------------------------------------------------- the app


app = FastAPI(title="ppsd-ray", description="OpenAI-compatible API over a PPSD pipeline",
              docs_url=None, redoc_url=None, openapi_url=None)
app.state.api_key = None
install_error_handlers(app)


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


def failure_reason(e: BaseException) -> str:
    """A Ray error as one line for the client: what failed, without Ray's traceback."""
    if isinstance(e, ray.exceptions.RayActorError):
        return "the pipeline's coordinator died or cannot be reached"
    if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        return f"{type(e.cause).__name__}: {e.cause}"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@serve.deployment
@serve.ingress(app)
class PPSDServer:
    def __init__(self, settings: dict):
        self.settings = ServeSettings(**settings)
        app.state.api_key = self.settings.replica_key()
        # its stages in actors, always: the health probe, metrics and cancels are the coordinator's
        config = self.settings.pipeline.model_copy(update={"in_process": False})
        plan = resolve(config, self.settings.mode)  # mode None: auto, on the configured stages
        self.mode = plan.mode
        print(f"ppsd serve: plan: {plan.describe()}", file=sys.stderr, flush=True)
        pg = ray.util.get_current_placement_group()  # the replica's own: bundle 0 is this actor
        self.pipe = Pipeline(config, pg=pg, first_bundle=1 if pg is not None else 0, plan=plan)
        self._submitter = ThreadPoolExecutor(1, thread_name_prefix="ppsd-submit")
        tokenizer = load_tokenizer(config.model_dir)
        self._probe_ids = encode_prompt(tokenizer, PROBE_PROMPT, raw=True)
        self.openai = OpenAIServing(
            tokenizer, self.settings.model_name or Path(config.model_dir).name,
            config.info.eos_token_ids, config.info.max_positions, self.settings.max_tokens_limit,
            self.mode, plan.stages, self._tokens, self.settings.timeout_s)

    def __del__(self):  # Serve calls this when the replica shuts down
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            try:
                pipe.shutdown()
            except Exception:
                pass

    async def check_health(self) -> None:
        """Serve's replica health check (every health_check_period_s): raises when the probe fails."""
        await self._probe()

    async def _probe(self) -> "Health":
        """The coordinator decodes one greedy token through every stage within
        health_check_timeout_s; else an APIError (503) naming what failed."""
        deadline = self.settings.health_check_timeout_s
        try:
            ref = await self._submit(self.pipe.coordinator.health.remote, self._probe_ids, self.mode.value, deadline)
            return await asyncio.wait_for(ref, deadline)
        except asyncio.TimeoutError:
            reason = f"the pipeline decoded no token within {deadline:g} s"
        except Exception as e:
            reason = failure_reason(e)
        raise APIError(503, f"unhealthy: {reason}", type="server_error", code="unhealthy")

    # -- endpoints

    @app.get("/health")
    async def health(self) -> dict:
        """503 unless the health probe passes; `sequences`: per stage, how many hold state;
        `repairs`: pipeline rebuilds after a stage process died (`stage_pids`: the current ones)."""
        probe = await self._probe()
        return {"status": "ok", "model": self.openai.model_id, "stages": self.pipe.plan.stages,
                "mode": self.mode.value, "layout": self.pipe.layout, "running": probe.running,
                "sequences": [len(s) for s in probe.sequences], "stage_pids": probe.stage_pids,
                "repairs": probe.repairs}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self.openai.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict:
        self.openai.check_model(model_id)
        return self.openai.model_card()

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        return await self.openai.completions(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        return await self.openai.chat(body)

    # -- generation

    async def _tokens(self, ids: list[int], gen: GenerationConfig
                      ) -> AsyncIterator[int | TokenLogprobs | dict | None]:
        """Tokens as the coordinator commits them (None while it waits for admission), then its
        stats dict, through the pipeline's feed (one Ray item a step for all of this replica's
        requests). Cancels the request in the coordinator when the caller stops early (a stop
        string, a client that went away)."""
        loop, items = asyncio.get_running_loop(), asyncio.Queue()
        feed, coordinator = self.pipe.feed, self.pipe.coordinator
        seq_id = feed.open(lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
        done = False
        try:
            try:
                started = await self._submit(coordinator.start.remote, feed.name, seq_id, ids,
                                             gen.model_dump(mode="json"))
                await asyncio.wait_for(started, self.settings.timeout_s)
            except ray.exceptions.RayError as e:
                raise RuntimeError(failure_reason(e)) from e
            while not done:
                item = await items.get()
                if isinstance(item, Failed):
                    done = True
                    raise RuntimeError(failure_reason(item.error)) from item.error
                done = isinstance(item, dict)
                yield item
        finally:
            feed.close(seq_id)
            if not done:  # stop decoding after the next token, or before the prefill if still queued
                await self._submit(coordinator.cancel.remote, seq_id)

    async def _submit(self, method, *args):
        """Calls method.remote(*args) from a thread of our own, so that the call is not a
        child of the request's Ray task. When a client disconnects, Serve cancels that task
        with ray.cancel(recursive=True), which would also cancel the coordinator's queued
        calls to the stages; Ray 2.60 then leaves a gap in the stage actor's call sequence
        and the next request on that stage stalls for 30 s and fails. Submitting does not
        wait for the call, but it too has a deadline."""
        submitted = asyncio.get_running_loop().run_in_executor(self._submitter, method, *args)
        return await asyncio.wait_for(submitted, self.settings.timeout_s)



# ---------------------------------------------------------------- `ppsd serve`


class _Stop(BaseException):
    pass


def serve_forever(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
                  metrics_port: int | None = None, address: str | None = None) -> int:
    """Starts a new local Ray (or joins `address`), deploys the application, blocks until
    SIGTERM or Ctrl-C, then shuts down Serve and the Ray processes it started (on a
    joined cluster: deletes only this application). Returns the exit code: 1 when the
    application fails to start (a replica without the API key, ...)."""
    own = address is None
    # a new local Ray: never join a cluster some other `ray start` left on this machine by accident
    init: dict[str, Any] = {"address": "local" if own else address, "log_to_driver": True}
    if own and metrics_port:
        init["_metrics_export_port"] = metrics_port
    start_ray(**init)

    def stop(signum, frame):
        raise _Stop(signum)

    try:
        # ray.init installed a SIGTERM handler that exits at once; ours unwinds through finally
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        serve.start(http_options={"host": host, "port": port})
        try:
            # unset fields stay unset: mode auto with no stages plans K too
            serve.run(build_app(settings.model_dump(mode="json", exclude_unset=True)), name="ppsd", route_prefix="/",
                      blocking=False)
        except RuntimeError as e:  # Serve's "Deploying application ppsd failed", with the replica's error
            print(f"ppsd serve: the application failed to start: {e}", file=sys.stderr, flush=True)
            return 1
        node = ray._private.worker.global_worker.node
        # Ray's own endpoint, not this app's: the API key does not guard it (see docs/serving.md)
        print(f"ppsd serve: ready on http://{host}:{port}/v1 (model {settings.pipeline.model_dir}); "
              "Prometheus metrics on "
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
