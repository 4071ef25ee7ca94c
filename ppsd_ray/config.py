"""Pydantic configs for the pipeline and for one generation request: plain, validated data.

Every value is checked here, before any actor starts; a bad value fails with
one message that names the field. A config neither measures nor plans: what
'auto' resolves to (exit layer, head) is ppsd_ray.plan's `resolve(config)`.
"""
from __future__ import annotations

import numbers
import re
import secrets
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .families import family_of, read_config_json, read_json_object
from .heads import HeadMismatch, check_head_meta, read_head_meta
from .model import cache_dir, check_weights, resolve_model
from .protocol import Sampling


class Mode(str, Enum):
    auto = "auto"  # what the plan chose for this pipeline on this machine (ppsd_ray.plan.resolve)
    ppsd = "ppsd"  # verify-while-draft on K stages
    eesd = "eesd"  # classic early-exit self-speculation: draft gamma, verify in one pass
    pp = "pp"      # K stages, no speculation: one token in the pipe at a time
    ar = "ar"      # one stage holding the whole model, plain greedy decoding


class Transport(str, Enum):
    direct = "direct"  # persistent stage loops: TCP headers, torch.distributed hidden states
    ray = "ray"        # one Ray actor call per stage per call, hidden states as object refs


class ModelInfo(BaseModel):
    """What the pipeline needs to know of a model, read from its config.json."""
    model_config = ConfigDict(frozen=True)

    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]
    kv_values_per_token: int = 0  # keys and values one position stores over all layers

    @property
    def kv_bytes_per_token(self) -> int:
        """At fp32, the widest dtype a stage runs in."""
        return 4 * self.kv_values_per_token

    @classmethod
    def read(cls, model_dir: Path) -> "ModelInfo":
        """ValueError naming the file and key if config.json does not describe a model."""
        cfg = read_json_object(model_dir / "config.json")
        eos = cfg.get("eos_token_id")
        gen_file = model_dir / "generation_config.json"
        if gen_file.exists():  # generate() stops on generation_config's eos, so do we
            eos = read_json_object(gen_file).get("eos_token_id", eos)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        missing = [k for k in ("num_hidden_layers", "hidden_size", "vocab_size") if k not in cfg]
        if missing:
            raise ValueError(f"{model_dir / 'config.json'}: no {', '.join(missing)}")
        try:
            return cls(
                num_layers=cfg["num_hidden_layers"],
                hidden_size=cfg["hidden_size"],
                vocab_size=cfg["vocab_size"],
                max_positions=cfg.get("max_position_embeddings", 2048),
                eos_token_ids=tuple(eos),
                kv_values_per_token=2 * cfg["num_hidden_layers"] * _kv_width(cfg),
            )
        except ValidationError as e:
            raise ValueError(f"{model_dir / 'config.json'}: {describe(e)}") from None


def _kv_width(cfg: dict) -> int:
    """Key (or value) numbers one layer stores per position."""
    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return (cfg.get("num_key_value_heads") or heads) * head_dim


class LearnConfig(BaseModel):
    """Online learning of the exit head from the server's own traffic (ppsd_ray/online.py)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    buffer_positions: int = Field(65536, ge=1, description="positions of committed sequences kept for training "
                                                           "(exit hidden states fp16 and next tokens), the newest "
                                                           "sequences replacing the oldest")
    holdout_fraction: float = Field(0.1, gt=0, le=0.5, description="share of the sequences held back to score "
                                                                   "heads on (every 1/fraction-th sequence)")
    min_holdout: int = Field(256, ge=1, description="held-back positions needed before a head is scored")
    margin: float = Field(0.01, ge=0, le=1, description="greedy acceptance on the held-back positions a candidate "
                                                        "must gain over the serving head to replace it")
    batch_positions: int = Field(256, ge=1, description="positions per training step")
    lr: float = Field(1e-3, gt=0, description="the candidate's learning rate")
    steps_per_round: int = Field(50, ge=1, description="training steps before a candidate is scored")
    passes: float = Field(4.0, gt=0, description="the most times each position seen is trained on: rounds go on "
                                                 "after the traffic stops until then, and wait for new traffic after")
    threads: int = Field(1, ge=1, description="torch threads of the trainer, at the lowest CPU priority")
    store: Path = Field(default_factory=lambda: cache_dir() / "learned-heads",
                        description="where versions are kept: a directory per model fingerprint and exit layer")

    @property
    def holdout_every(self) -> int:
        """Every this many-th sequence goes to the held-back ring."""
        return max(2, round(1 / self.holdout_fraction))

    @property
    def holdout_positions(self) -> int:
        """The held-back ring's size: the buffer's share, at least min_holdout."""
        return max(self.min_holdout, round(self.buffer_positions * self.holdout_fraction))

    @model_validator(mode="after")
    def _batch_fits_buffer(self) -> "LearnConfig":
        if self.batch_positions > self.buffer_positions:
            raise _field_error("batch_positions", f"{self.batch_positions} is more than buffer_positions "
                                                  f"({self.buffer_positions})")
        return self


class PipelineConfig(BaseModel):
    """How the model is cut into stages and where the stages run."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: Path = Field(description="Hugging Face model directory (config.json + safetensors), or "
                                        "'default' (SmolLM2-135M-Instruct)")
    stages: int = Field(2, ge=1, description="K, the number of pipeline stages")
    exit_layer: int | Literal["auto"] | None = Field(
        "auto", description="E: stage 1 holds layers [0, E). 'auto': the E (and, with head 'auto', the head) "
                            "predicted fastest from a short calibration of layer, exit head and LM head costs on "
                            "the stages' devices and threads (ppsd_ray/plan.py); None: L/K")
    head: str = Field("auto", description="exit head: 'auto' (of the shipped heads for this model and exit "
                                          "layer and 'lm', the one predicted fastest), 'lm', or a trained "
                                          "head's .safetensors file (its metadata must match the model and "
                                          "exit layer)")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    use_gpus: bool | None = Field(None, description="one GPU per stage; default: if the cluster has GPUs")
    threads_per_stage: int | None = Field(None, ge=1, description="torch threads per CPU stage")
    cpus_per_stage: float = Field(0.1, gt=0, description="Ray CPU reservation of a CPU stage")
    window: int | None = Field(None, ge=1, description="ppsd: tokens in flight; default K")
    max_num_seqs: int = Field(32, ge=1, description="sequences decoded at once, their calls batched into one "
                                                    "forward per stage step; more requests wait their turn")
    concurrency: int = Field(1, ge=1, description="how many sequences usually decode at once, for mode auto and "
                                                  "the stages' kernels to plan for: 1, one request's latency; "
                                                  "more, the throughput of that many together (ppsd_ray/plan.py); "
                                                  "at most max_num_seqs")
    max_batch_tokens: int = Field(512, ge=1, description="most tokens one stage step computes (decode tokens, "
                                                         "drafts, prefill chunks of all sequences together)")
    draft_max_seqs: int | None = Field(2, ge=0, description="a ppsd request drafts only if it starts while at "
                                                            "most this many sequences decode (itself included); "
                                                            "above, it runs as pp: under load the pipe is full "
                                                            "without speculation and rejected drafts cost real "
                                                            "compute (measured: docs/batching.md). None: always")
    kv_budget_gb: float = Field(4.0, gt=0, description="KV cache memory the stages may hold together: a request "
                                                       "reserves its prompt + max_new_tokens positions when it is "
                                                       "admitted and waits while they do not fit")
    prefill_chunk: int = Field(128, ge=1, description="a prompt enters the pipeline in chunks of this many tokens, "
                                                      "so the streams already running keep going between them")
    transport: Transport = Field(Transport.direct, description="how hidden states move between stages")
    timeout_s: float = Field(120.0, gt=0, description="longest wait for any one answer from the stages")
    max_restarts: int = Field(10, ge=0, description="times each stage's process is restarted after dying")
    in_process: bool | None = Field(None, description="run a one-stage pipeline in the caller's process: no Ray, "
                                                      "no actor hop per token. None: whenever the plan has one "
                                                      "stage on this CPU, one sequence at a time (max_num_seqs 1), "
                                                      "and no cluster to join (RAY_ADDRESS unset)")
    learn_drafts: bool = Field(False, description="stage 1's exit head learns from the verified positions of the "
                                                  "pipeline's own traffic; a better head serves the requests that "
                                                  "start after it is installed (docs/heads.md)")
    learn: LearnConfig = Field(default_factory=LearnConfig, description="how it learns, with learn_drafts")

    @field_validator("model_dir", mode="before")
    @classmethod
    def _resolve_default(cls, v):
        return resolve_model(v) if isinstance(v, str) else v

    @field_validator("model_dir")
    @classmethod
    def _model_dir_is_a_model(cls, v: Path) -> Path:
        v = Path(v).expanduser()
        if not (v / "config.json").is_file():
            raise ValueError(f"no config.json in {v}")
        family_of(read_config_json(v))  # an unsupported family is refused here, naming its model_type
        ModelInfo.read(v)
        check_weights(v)
        return v

    @field_validator("head")
    @classmethod
    def _head_exists(cls, v: str) -> str:
        if v not in ("auto", "lm") and not Path(v).is_file():
            raise ValueError(f"not 'auto', 'lm' or a file: {v}")
        return v

    @model_validator(mode="after")
    def _fits_model(self) -> "PipelineConfig":
        if self.concurrency > self.max_num_seqs:
            raise _field_error("concurrency", f"{self.concurrency} sequences at once, but max_num_seqs "
                                              f"{self.max_num_seqs} decode at once")
        layers = self.info.num_layers
        if self.stages > layers:
            raise _field_error("stages", f"{self.stages} stages for a {layers}-layer model")
        if self.stages > 1:
            e = self.given_exit_layer
            if e is not None:
                check_exit_layer(e, self.stages, layers)
            if self.head not in ("auto", "lm"):  # a trained head: refused here, before any actor starts
                try:  # e None ('auto'): any exit layer here; plan.resolve checks the one it picks
                    meta = read_head_meta(self.head)
                    check_head_meta(meta, self.model_dir, e, self.head)
                except HeadMismatch as err:
                    raise ValueError(str(err)) from None
        elif self.learn_drafts:
            raise _field_error("learn_drafts", "needs a pipeline of at least 2 stages: drafts come from stage 1's "
                                               "exit head")
        if self.in_process:
            if "stages" in self.model_fields_set and self.stages > 1:
                raise _field_error("in_process", f"runs one stage, not {self.stages}: a pipeline's stages run "
                                                 "side by side in Ray actors")
            if self.use_gpus:
                raise _field_error("in_process", "runs on this process's CPU, not use_gpus")
            if self.learn_drafts:
                raise _field_error("in_process", "runs one stage, which drafts nothing: not with learn_drafts")
        return self

    @cached_property
    def info(self) -> ModelInfo:
        return ModelInfo.read(self.model_dir)

    @property
    def batched_stages(self) -> bool:
        """Whether stages run their rows with the kernels made for batches (oneDNN's packed one
        or tiles, kv.batch_invariant), or each row with the 1-row kernel, fastest alone
        (kv.one_row_tiling): as planned for `concurrency`. Either way a request's tokens are
        the same alone and among others."""
        return self.max_num_seqs > 1 and self.concurrency > 1

    @property
    def given_exit_layer(self) -> int | None:
        """The exit layer this config fixes: its own, or L/K for None; None for 'auto' (or K = 1)."""
        if self.stages == 1 or self.exit_layer == "auto":
            return None
        if isinstance(self.exit_layer, int):
            return self.exit_layer
        return round(self.info.num_layers / self.stages)




def check_exit_layer(e: int, stages: int, layers: int) -> None:
    """ValueError naming exit_layer unless stage 1 ending at layer e leaves each later stage a layer."""
    if not 1 <= e <= layers - (stages - 1):
        raise _field_error(
            "exit_layer",
            f"{e} leaves no layers for stages 2..{stages}: "
            f"must be in [1, {layers - stages + 1}] for {stages} stages of a {layers}-layer model")


MAX_LOGPROBS = 5

# Sampling settings, one definition each: GenerationConfig, the CLI and the OpenAI API all use them.
Temperature = Annotated[float, Field(ge=0, description="0: greedy, the model's own greedy output")]
TopP = Annotated[float, Field(gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens "
                                                       "whose probability reaches top_p")]
TopK = Annotated[int, Field(ge=0, description="keep the k most likely tokens; 0: all")]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**63, description="the sampler's random seed (int64)")]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS, description="the chosen token's logprob plus this "
                                                                   "many top alternatives")]


class GenerationConfig(BaseModel):
    """One request's decoding settings. temperature 0 is greedy: the output is the model's own
    greedy output; above 0, speculative sampling keeps the output distribution the model's own."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Mode.auto
    max_new_tokens: int = Field(128, ge=1)
    gamma: int = Field(4, ge=1, le=64, description="eesd: drafts per verification")
    stop_on_eos: bool = True
    timeline: bool = Field(False, description="return each stage's call timestamps in the stats")
    temperature: Temperature = 0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    logprobs: Logprobs | None = Field(None, description="None: no logprobs; else each token comes as a "
                                                        "ppsd_ray.schedule.TokenLogprobs")

    def sampling(self) -> Sampling:
        """The settings the stages draw with; without a seed, a random one for this request."""
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        return Sampling(self.temperature, self.top_p, self.top_k, seed, self.logprobs)


def check_prompt(prompt_ids, info: ModelInfo, gen: GenerationConfig) -> None:
    """A request's prompt against the model, before any stage sees it: ValueError naming
    the field. An id outside the embedding would be an index error on CPU and, on CUDA,
    a device-side assert that leaves the stage's GPU context unusable."""
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__len__"):
        raise _field_error("prompt_ids", f"a list of token ids, not {type(prompt_ids).__name__}")
    if len(prompt_ids) == 0:
        raise _field_error("prompt_ids", "empty; a prompt needs at least one token")
    for i, t in enumerate(prompt_ids):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool):
            raise _field_error("prompt_ids", f"[{i}] is {type(t).__name__} {t!r}, not an int")
        if not 0 <= t < info.vocab_size:
            raise _field_error("prompt_ids", f"[{i}] = {t} is outside the model's vocabulary [0, {info.vocab_size})")
    if len(prompt_ids) + gen.max_new_tokens > info.max_positions:
        raise _field_error("max_new_tokens", f"prompt ({len(prompt_ids)}) + max_new_tokens ({gen.max_new_tokens}) "
                                             f"exceeds the model's {info.max_positions} positions")


def _field_error(field: str, msg: str) -> ValueError:
    return ValueError(f"{field}: {msg}")


def describe(err: ValidationError) -> str:
    """One line per bad field: 'field: message' (a nested field as 'outer.field')."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        named = re.match(r"([A-Za-z_]\w*): (.*)", msg, re.S)
        if named and loc and e["type"] == "value_error":  # a model validator's _field_error, one level down
            loc.append(named[1])
            msg = named[2]
        lines.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(lines)
