"""Everything that differs between model families, in one place (as vLLM gives each family its loader).

A stage is transformers' own base-model class (LlamaModel, Gemma3TextModel, ...) built
for a layer range and given only that range's weights. The families differ in:

- checkpoint names: where the layers, embedding, final norm and LM head live;
- buffers that are not in the checkpoint (rotary frequencies, Gemma's embedding
  scale), rebuilt after the weights are assigned off the meta device;
- what the embedding does: Gemma scales inside its embedding module, Granite
  multiplies `inputs_embeds` inside the model's forward. Every stage after the
  first passes its hidden state in as `inputs_embeds`, so a multiplier in the
  forward would be applied once per stage: it is moved into stage 1's
  embedding and the forward's copy is set to 1;
- the LM head's logit transforms: Granite divides by `logits_scaling`, Gemma 2
  soft-caps (`final_logit_softcapping`);
- sliding-window attention (Mistral, Phi-3, Qwen2, Gemma 2/3): transformers'
  sliding cache layers keep only the last window and cannot roll back past it,
  so every layer here keeps its full KV and the attention mask does the
  windowing (`new_cache`).

A family not in FAMILIES is refused when the pipeline config is read, naming its
model_type: a family whose forward transforms its inputs in a way not listed
here would give wrong tokens without an error.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, DynamicCache


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str
    prefix: str = "model."  # checkpoint names: {prefix}layers.N., {prefix}embed_tokens, {prefix}norm
    # the base model's attribute (from config field of the same name) that its forward
    # multiplies inputs_embeds by; moved into stage 1's embedding
    forward_embedding_multiplier: str | None = None
    notes: str = ""


FAMILIES = {f.model_type: f for f in [
    Family("llama", "Llama", notes="also SmolLM2, Llama 2/3"),
    Family("qwen2", "Qwen2 / Qwen2.5", notes="sliding window (use_sliding_window) supported"),
    Family("qwen3", "Qwen3"),
    Family("mistral", "Mistral", notes="sliding window supported"),
    Family("gemma2", "Gemma 2", notes="embedding scale, final logit soft-capping, attention soft-capping "
                                      "(eager attention), alternating sliding window"),
    Family("gemma3_text", "Gemma 3 (text)", notes="embedding scale, alternating sliding window, two rotary "
                                                 "bases; multimodal Gemma 3 checkpoints are refused"),
    Family("phi3", "Phi-3", notes="fused qkv / gate_up weights; sliding window supported"),
    Family("olmo2", "OLMo 2"),
    Family("granite", "Granite", forward_embedding_multiplier="embedding_multiplier",
           notes="embedding multiplier moved into stage 1; logits_scaling in the LM head"),
]}

# Known model types with a clear reason why not, for a better message than "unsupported".
_WHY_NOT = {
    "gemma3": "a multimodal Gemma 3 checkpoint; only the text model (model_type gemma3_text) is supported",
    "gemma": "Gemma 1 is not tested here",
}


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (config.json, generation_config.json); ValueError naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object")
    return obj


def read_config_json(model_dir: Path) -> dict:
    return read_json_object(Path(model_dir) / "config.json")


def family_of(cfg: dict) -> Family:
    """The family of a config.json's contents; ValueError naming the model_type if unsupported."""
    model_type = cfg.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        why = _WHY_NOT.get(model_type, "no adapter for this family in ppsd_ray/families.py")
        raise ValueError(f"model_type {model_type!r} is not supported ({why}); supported: "
                         f"{', '.join(FAMILIES)}")
    if cfg.get("quantization_config"):
        raise ValueError(f"model_type {model_type!r}: a quantized checkpoint "
                         f"({cfg['quantization_config'].get('quant_method')}); convert it to float weights first")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"model_type {model_type!r}: bidirectional attention (an embedding model), not a causal LM")
    return family


def shard_config(config, start: int, stop: int):
    """The config of a model holding only layers [start, stop) of `config`'s model."""
    shard = copy.deepcopy(config)
    shard.num_hidden_layers = stop - start
    if getattr(config, "layer_types", None):
        shard.layer_types = config.layer_types[start:stop]
    return shard


class MultipliedEmbedding(nn.Embedding):
    """Token embedding times a constant: what Granite's forward does to inputs_embeds, done once, in stage 1."""

    def __init__(self, embedding: nn.Embedding, multiplier: float):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                         device="meta", dtype=embedding.weight.dtype)
        self.weight = embedding.weight
        self.multiplier = multiplier

    def forward(self, ids):
        return super().forward(ids) * self.multiplier


class LMHead(nn.Linear):
    """The output projection with the family's logit transforms, in transformers' order:
    Granite divides by logits_scaling, Gemma 2 soft-caps. Both keep the argmax; they
    matter for distributions (exit-head distillation, sampling). `matmul` is F.linear, or
    in a stage the batch-invariant tiled one (kv.batch_invariant)."""

    matmul = staticmethod(nn.functional.linear)

    def __init__(self, weight: torch.Tensor, config):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.logits_scaling = getattr(config, "logits_scaling", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, hidden):
        logits = self.matmul(hidden, self.weight, self.bias)
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def base_model(config, dtype, device=None) -> nn.Module:
    """transformers' own base-model class for `config` (a shard's), its forward made to
    take every stage's inputs_embeds unchanged."""
    body = AutoModel.from_config(config, dtype=dtype)
    family = family_of(config.to_dict())
    if family.forward_embedding_multiplier:
        setattr(body, family.forward_embedding_multiplier, 1.0)
    return body if device is None else body.to(device)


@dataclass
class Shard:
    config: object           # the shard's config (num_hidden_layers = stop - start)
    body: nn.Module          # base model: layers [start, stop); norm only if it holds the last layer
    final_norm: nn.Module | None
    lm_head: LMHead | None


def build_shard(model_dir: Path, start: int, stop: int, *, embed: bool, head: bool,
                dtype=torch.float32, device="cpu") -> Shard:
    """Layers [start, stop) of the model in model_dir: the class built on the meta
    device, then only this range's tensors read and assigned. `embed`: the body keeps
    the token embedding (stage 1), with the family's scale or multiplier in it.
    `head`: the final norm and LM head are built too (last stage, exit heads)."""
    model_dir = Path(model_dir)
    family = family_of(read_config_json(model_dir))
    config = AutoConfig.from_pretrained(model_dir)
    shard = shard_config(config, start, stop)
    p = family.prefix
    last = stop == config.num_hidden_layers
    tied = config.tie_word_embeddings
    wanted = {f"{p}layers.{start + i}.": f"layers.{i}." for i in range(stop - start)}
    if embed or (head and tied):
        wanted[f"{p}embed_tokens."] = "embed_tokens."
    if head or last:
        wanted[f"{p}norm."] = "norm."
    names = tensor_names(model_dir)
    pick = {n: wanted[w] + n[len(w):] for n in names for w in wanted if n.startswith(w)}
    if head and not tied:
        pick["lm_head.weight"] = "lm_head.weight"
    state = {pick[n]: t.to(dtype) for n, t in load_tensors(model_dir, list(pick)).items()}

    with torch.device("meta"):
        body = base_model(shard, dtype)
    lm_weight = state.pop("lm_head.weight", state.get("embed_tokens.weight"))
    if not embed:
        state.pop("embed_tokens.weight", None)
        body.embed_tokens = None
    body.load_state_dict(state, strict=False, assign=True)
    _rebuild_buffers(body, shard)
    if embed and family.forward_embedding_multiplier:
        body.embed_tokens = MultipliedEmbedding(body.embed_tokens,
                                                getattr(config, family.forward_embedding_multiplier))

    final_norm = lm_head = None
    if head:
        if lm_weight is None:
            raise ValueError(f"model_dir: {model_dir} has neither lm_head.weight nor {p}embed_tokens.weight")
        final_norm = body.norm
        lm_head = LMHead(lm_weight, config).to(device)
    if not last:
        body.norm = nn.Identity()  # the final norm belongs after the last layer only
    missing = [n for n, t in [*body.named_parameters(), *body.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"model_dir: {model_dir} lacks weights for {missing[:3]} "
                         f"(looked for {p}layers.N.*, {p}embed_tokens.*, {p}norm.*, lm_head.weight)")
    return Shard(shard, body.to(device).eval(), final_norm, lm_head)


def load_tensors(model_dir: Path, names: list[str]) -> dict:
    """Reads only the named tensors from the model's safetensors files."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        where = {n: "model.safetensors" for n in names}
    out = {}
    for file in sorted({where[n] for n in names if n in where}):
        with safe_open(model_dir / file, framework="pt") as f:
            keys = set(f.keys())
            for n in names:
                if n in keys:
                    out[n] = f.get_tensor(n)
    return out


def tensor_names(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return list(f.keys())


def _rebuild_buffers(body: nn.Module, config) -> None:
    """Buffers computed in __init__ and not stored in checkpoints stay on the meta
    device after an assign-load: rotary frequencies, Gemma's embedding scale."""
    body.rotary_emb = type(body.rotary_emb)(config=config)
    emb = body.embed_tokens
    if emb is not None and hasattr(emb, "scalar_embed_scale"):
        emb.embed_scale = torch.tensor(emb.scalar_embed_scale)


def layer_prefix(model_dir: Path, layer: int) -> str:
    """Checkpoint name prefix of decoder layer `layer`."""
    return f"{family_of(read_config_json(model_dir)).prefix}layers.{layer}."


def decoder(causal_lm: nn.Module) -> nn.Module:
    """The base model (with .layers and .norm) inside a *ForCausalLM."""
    family = family_of(causal_lm.config.to_dict())
    return getattr(causal_lm, family.prefix.rstrip("."))


class StageCache(DynamicCache):
    """A per-sequence KV cache that rolls back to any position.

    Every layer keeps its full KV, sliding-window layers too: the model's own
    sliding-window attention mask hides what lies outside the window (the same
    positions transformers' sliding cache would have dropped), and a rollback past
    the window still finds the entries it needs."""

    def crop(self, keep: int) -> None:
        """Keeps positions [0, keep); `keep` is an absolute length, not a count to remove. Each
        layer is cropped by its own length: a call stopped between layers leaves them uneven."""
        if keep < 0:
            raise ValueError(f"crop: keep must be >= 0, got {keep}")
        for layer in self.layers:
            held = layer.get_seq_length()
            if held > keep:
                layer.crop(keep - held)


def new_cache(config) -> StageCache:
    """An empty cache for one sequence on a shard (or exit head) with this config."""
    other = set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"}
    if other:
        raise ValueError(f"model_type {config.model_type!r}: layer types {sorted(other)} have no rollback-safe cache")
    return StageCache()
