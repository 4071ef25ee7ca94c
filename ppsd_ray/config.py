"""Pydantic configs for the pipeline and for one generation request.

Every value is checked here, before any actor starts; a bad value fails with
one message that names the field.
"""
from __future__ import annotations

import json
from enum import Enum
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Mode(str, Enum):
    ppsd = "ppsd"  # verify-while-draft on K stages
    eesd = "eesd"  # classic early-exit self-speculation: draft gamma, verify in one pass
    pp = "pp"      # K stages, no speculation: one token in the pipe at a time
    ar = "ar"      # one stage holding the whole model, plain greedy decoding


class ModelInfo(BaseModel):
    """What the pipeline needs to know of a model, read from its config.json."""
    model_config = ConfigDict(frozen=True)

    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def read(cls, model_dir: Path) -> "ModelInfo":
        cfg = json.loads((model_dir / "config.json").read_text())
        eos = cfg.get("eos_token_id")
        gen_file = model_dir / "generation_config.json"
        if gen_file.exists():  # generate() stops on generation_config's eos, so do we
            eos = json.loads(gen_file.read_text()).get("eos_token_id", eos)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            vocab_size=cfg["vocab_size"],
            max_positions=cfg.get("max_position_embeddings", 2048),
            eos_token_ids=tuple(eos),
        )


class PipelineConfig(BaseModel):
    """How the model is cut into stages and where the stages run."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: Path = Field(description="Hugging Face model directory (config.json + safetensors)")
    stages: int = Field(2, ge=1, description="K, the number of pipeline stages")
    exit_layer: int | None = Field(None, description="E: stage 1 holds layers [0, E); default: L/K")
    head: str = Field("auto", description="exit head: 'auto' (the shipped head for this model and exit "
                                          "layer, else 'lm'), 'lm', or a trained head's .safetensors file "
                                          "(its metadata must match the model and exit layer)")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    use_gpus: bool | None = Field(None, description="one GPU per stage; default: if the cluster has GPUs")
    threads_per_stage: int | None = Field(None, ge=1, description="torch threads per CPU stage")
    cpus_per_stage: float = Field(0.1, gt=0, description="Ray CPU reservation of a CPU stage")
    window: int | None = Field(None, ge=1, description="ppsd: tokens in flight; default K")

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, v: Path) -> Path:
        v = Path(v).expanduser()
        if not (v / "config.json").is_file():
            raise ValueError(f"no config.json in {v}")
        from .families import family_of, read_config_json

        family_of(read_config_json(v))  # an unsupported family is refused here, naming its model_type
        if not any((v / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            raise ValueError(f"no model.safetensors or model.safetensors.index.json in {v}: stages read "
                             "safetensors weights only (save the model with save_pretrained to convert)")
        return v

    @field_validator("head")
    @classmethod
    def _head_exists(cls, v: str) -> str:
        if v not in ("auto", "lm") and not Path(v).is_file():
            raise ValueError(f"not 'auto', 'lm' or a file: {v}")
        return v

    @model_validator(mode="after")
    def _fits_model(self) -> "PipelineConfig":
        layers = self.info.num_layers
        if self.stages > layers:
            raise _field_error("stages", f"{self.stages} stages for a {layers}-layer model")
        if self.stages > 1:
            e = self.exit_layer_or_default
            if not 1 <= e <= layers - (self.stages - 1):
                raise _field_error(
                    "exit_layer",
                    f"{e} leaves no layers for stages 2..{self.stages}: "
                    f"must be in [1, {layers - self.stages + 1}] for {self.stages} stages of a {layers}-layer model")
            if self.exit_head != "lm":  # a trained head: refused here, before any actor starts
                from .heads import HeadMismatch, check_head_meta, read_head_meta

                try:
                    check_head_meta(read_head_meta(self.exit_head), self.model_dir, e, self.exit_head)
                except HeadMismatch as err:
                    raise ValueError(str(err)) from None
        return self

    @cached_property
    def exit_head(self) -> str:
        """The head stage 1 loads: 'lm' or a file ('auto' resolved)."""
        if self.head != "auto":
            return self.head
        if self.stages == 1:
            return "lm"
        from .heads import resolve_head

        return resolve_head("auto", self.model_dir, self.exit_layer_or_default)

    @cached_property
    def info(self) -> ModelInfo:
        return ModelInfo.read(self.model_dir)

    @property
    def exit_layer_or_default(self) -> int:
        return self.exit_layer if self.exit_layer is not None else round(self.info.num_layers / self.stages)

    def layer_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) of each stage: stage 1 ends at the exit layer, the rest split evenly."""
        layers = self.info.num_layers
        if self.stages == 1:
            return [(0, layers)]
        e = self.exit_layer_or_default
        rest, k = layers - e, self.stages - 1
        bounds = [e + (rest * i) // k for i in range(k + 1)]
        return [(0, e)] + list(zip(bounds[:-1], bounds[1:]))


class GenerationConfig(BaseModel):
    """One request's decoding settings. Greedy: the output is the model's own greedy output."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Mode.ppsd
    max_new_tokens: int = Field(128, ge=1)
    gamma: int = Field(4, ge=1, le=64, description="eesd: drafts per verification")
    stop_on_eos: bool = True
    timeline: bool = Field(False, description="return each stage's call timestamps in the stats")


def _field_error(field: str, msg: str) -> ValueError:
    return ValueError(f"{field}: {msg}")


def describe(err: ValidationError) -> str:
    """One line per bad field: 'field: message'."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)
