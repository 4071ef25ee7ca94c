"""Exit heads: map the exit layer's hidden state to next-token logits.

Every head type loads through `load_exit_head`:

- `lm`: the model's own final norm and LM head applied at the exit layer (no training);
- `linear`: a residual linear adapter and an RMSNorm, then the model's LM head
  (shared, frozen): lm_head(norm(h + W h + b));
- `layer`: one decoder layer (transformers' own class, initialised from layer E
  when trained) and a norm, then the model's LM head (shared, frozen). It attends
  over past positions, so it keeps a KV cache per sequence (`needs_cache`).

Any head may carry a draft vocabulary (`set_draft_vocab`): a sorted list of
token ids, the only tokens it may propose. Its draft logits then use only those
rows of the LM head (copied once), which makes a draft several times cheaper
than the full-vocabulary LM head; its argmax maps back to full-vocabulary ids.

Trained heads are one .safetensors file holding only the head's own weights
(never the LM head) and, if it has one, its draft vocabulary (int64 tensor
`draft_vocab`). Its header metadata has one key, "ppsd_head", a JSON object:
head_type, exit_layer, model_fingerprint, hidden_size, vocab_size,
training_tokens, val_greedy_acceptance, val_top2_acceptance, command,
draft_vocab_size, ... A head whose metadata or vocabulary does not match the
model or the exit layer is refused.
"""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from .families import base_model, new_cache, shard_config
from .model import model_fingerprint

META_KEY = "ppsd_head"
VOCAB_KEY = "draft_vocab"  # the tensor in a head file (and in a draft vocabulary file)
HEAD_TYPES = ("lm", "linear", "layer")
SHIPPED_DIR = Path(__file__).parent / "heads"


class HeadMismatch(ValueError):
    """A trained head's metadata does not fit the model or exit layer; names the field."""


class ExitHead(nn.Module):
    """hidden [B, n, H] at the exit layer -> logits [B, n, V].

    `features` is the head's final (normed) hidden state; `logits` applies the
    shared LM head (full vocabulary: training); `draft_logits` and `draft_tokens`
    what drafting uses, restricted to the draft vocabulary if the head has one.
    A head with `needs_cache` takes every position of every call in order, with
    a cache that holds exactly the positions before them."""

    kind: str = "base"
    needs_cache: bool = False

    def __init__(self, exit_layer: int, lm_head: nn.Module):
        super().__init__()
        self.exit_layer = exit_layer
        self.lm_head = lm_head
        # non-persistent: never in a state dict, but moved with the head
        self.register_buffer("draft_vocab", None, persistent=False)
        self.draft_lm_head: nn.Module | None = None

    def features(self, hidden, position_ids=None, cache=None, attention_mask=None):
        raise NotImplementedError

    def logits(self, features):
        return self.lm_head(features)

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        """Restricts drafts to these token ids (None: the full vocabulary again). The draft
        LM head is built once here: the LM head's own class (so its logit transforms, e.g.
        soft-capping, apply alike) over only these rows."""
        if ids is None:
            self.draft_vocab = self.draft_lm_head = None
            return
        weight = self.lm_head.weight
        ids = check_draft_vocab(ids, weight.shape[0]).to(weight.device)
        rows = {id(weight): nn.Parameter(weight.detach()[ids].clone(), requires_grad=False)}
        bias = getattr(self.lm_head, "bias", None)
        if bias is not None:
            rows[id(bias)] = nn.Parameter(bias.detach()[ids].clone(), requires_grad=False)
        draft = copy.deepcopy(self.lm_head, memo=rows)  # the memo hands it the rows, never copying the full matrix
        draft.out_features = len(ids)
        self.draft_vocab, self.draft_lm_head = ids, draft

    def draft_logits(self, features) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits over the draft vocabulary, and the full-vocabulary id of each of their
        columns (None: no draft vocabulary, the columns are the ids)."""
        if self.draft_vocab is None:
            return self.logits(features), None
        return self.draft_lm_head(features), self.draft_vocab

    def draft_tokens(self, features) -> torch.Tensor:
        """The draft: the best token of the draft vocabulary, as a full-vocabulary id."""
        logits, ids = self.draft_logits(features)
        best = logits.argmax(-1)
        return best if ids is None else ids[best]

    def forward(self, hidden, position_ids=None, cache=None, attention_mask=None):
        return self.logits(self.features(hidden, position_ids, cache, attention_mask))

    def draft(self, hidden, position_ids=None, cache=None, last: int = 1) -> torch.Tensor | None:
        """Greedy drafts: hidden [B, n, H] at the exit layer -> the draft tokens [B, last] of
        its last `last` positions (None for 0); the whole work of one draft (calibrate.py
        times it). A head with a cache sees every position, drafted or not, so that its
        cache follows the layer caches exactly."""
        if self.needs_cache:
            feats = self.features(hidden, position_ids, cache)
        elif last:
            feats = self.features(hidden[:, -last:])
        return self.draft_tokens(feats[:, -last:]) if last else None

    def new_cache(self):
        return None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The head's own weights: what a head file holds (never the shared LM head)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("lm_head.", "draft_lm_head."))}


class LMExitHead(ExitHead):
    """The model's own final norm and LM head, shared with the last stage's weights."""

    kind = "lm"

    def __init__(self, exit_layer: int, norm: nn.Module, lm_head: nn.Module):
        super().__init__(exit_layer, lm_head)
        self.norm = norm

    def features(self, hidden, position_ids=None, cache=None, attention_mask=None):
        return self.norm(hidden)


class LinearExitHead(ExitHead):
    """lm_head(norm(h + W h + b)); W, b start at zero, the norm at the model's final norm."""

    kind = "linear"

    def __init__(self, exit_layer: int, norm: nn.Module, lm_head: nn.Module):
        super().__init__(exit_layer, lm_head)
        hidden = lm_head.weight.shape[1]
        self.proj = nn.Linear(hidden, hidden, bias=True, dtype=lm_head.weight.dtype,
                              device=lm_head.weight.device)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.norm = copy.deepcopy(norm)

    def features(self, hidden, position_ids=None, cache=None, attention_mask=None):
        return self.norm(hidden + self.proj(hidden))


class LayerExitHead(ExitHead):
    """One decoder layer + norm (transformers' own 1-layer model, no embeddings), then the LM head."""

    kind = "layer"
    needs_cache = True

    def __init__(self, exit_layer: int, config, lm_head: nn.Module):
        super().__init__(exit_layer, lm_head)
        # a copy of layer E's kind (its attention type: sliding or full), as training initialises it
        self.config = shard_config(config, exit_layer, exit_layer + 1)
        self.body = base_model(self.config, lm_head.weight.dtype, lm_head.weight.device)
        self.body.embed_tokens = None
        # transformers 5.24 renamed past_key_values to cache
        params = inspect.signature(self.body.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def features(self, hidden, position_ids=None, cache=None, attention_mask=None):
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
        out = self.body(inputs_embeds=hidden, position_ids=position_ids, attention_mask=attention_mask,
                        use_cache=cache is not None, **{self._cache_kw: cache})
        return out.last_hidden_state

    def new_cache(self):
        return new_cache(self.config)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = super().trainable_state()
        return {k: v for k, v in state.items() if "rotary_emb" not in k}


def build_head(kind: str, exit_layer: int, norm: nn.Module, lm_head: nn.Module, config=None) -> ExitHead:
    """A fresh head of a type (before training or loading weights)."""
    if kind == "lm":
        return LMExitHead(exit_layer, norm, lm_head)
    if kind == "linear":
        return LinearExitHead(exit_layer, norm, lm_head)
    if kind == "layer":
        if config is None:
            raise ValueError("head: a 'layer' head needs the model config")
        return LayerExitHead(exit_layer, config, lm_head)
    raise ValueError(f"head: unknown head type {kind!r}; one of {', '.join(HEAD_TYPES)}")


def read_head_meta(path: Path | str) -> dict:
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # not a safetensors file at all
        raise HeadMismatch(f"head: {path} is not a safetensors head file ({e})") from None
    if raw is None:
        raise HeadMismatch(f"head: {path} has no '{META_KEY}' metadata; not a trained exit head")
    return json.loads(raw)


def check_draft_vocab(ids: torch.Tensor, vocab_size: int, where: str = "draft_vocab") -> torch.Tensor:
    """A draft vocabulary: 1-D, int64, strictly increasing ids in [0, vocab_size)."""
    if ids.dim() != 1 or ids.dtype != torch.int64 or not len(ids):
        raise HeadMismatch(f"{where}: must be a non-empty 1-D int64 tensor of token ids")
    if not bool((ids[1:] > ids[:-1]).all()):
        raise HeadMismatch(f"{where}: token ids must be sorted and unique")
    if int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
        raise HeadMismatch(f"{where}: token id {int(ids[-1])} is outside the model's vocabulary of {vocab_size}")
    return ids


def read_draft_vocab(path: Path | str, meta: dict, vocab_size: int) -> torch.Tensor | None:
    """A head file's draft vocabulary (None: it has none), checked against its metadata
    and the model's vocabulary size."""
    with safe_open(path, framework="pt") as f:
        ids = f.get_tensor(VOCAB_KEY) if VOCAB_KEY in f.keys() else None
    size = meta.get("draft_vocab_size")
    if ids is None and size is None:
        return None
    if ids is None or size != len(ids):
        raise HeadMismatch(f"head: {path}: draft_vocab_size {size} does not match its draft_vocab tensor "
                           f"({'none' if ids is None else len(ids)} ids)")
    return check_draft_vocab(ids, vocab_size, f"head: {path}: draft_vocab")


def check_head_meta(meta: dict, model_dir: Path, exit_layer: int | None, path: Path | str = "head") -> None:
    """Raises HeadMismatch naming the first field that does not fit the model / exit layer
    (its draft vocabulary included). exit_layer None: any exit layer (the pipeline's is not
    known yet: 'auto', resolved by ppsd_ray.plan, which checks the head again)."""
    kind = meta.get("head_type")
    if kind not in HEAD_TYPES or kind == "lm":
        raise HeadMismatch(f"head: {path}: head_type {kind!r} is not a trained head type (linear, layer)")
    fp = model_fingerprint(model_dir)
    if meta.get("model_fingerprint") != fp:
        raise HeadMismatch(f"head: {path}: model_fingerprint {meta.get('model_fingerprint')} was trained "
                           f"for another model (this model {model_dir} is {fp})")
    if exit_layer is not None and meta.get("exit_layer") != exit_layer:
        raise HeadMismatch(f"head: {path}: exit_layer {meta.get('exit_layer')} does not match the "
                           f"pipeline's exit layer {exit_layer}")
    vocab_size = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    read_draft_vocab(path, meta, vocab_size)


def save_head(head: ExitHead, path: Path | str, meta: dict) -> None:
    meta = {**meta, "head_type": head.kind, "exit_layer": head.exit_layer}
    meta.pop("draft_vocab_size", None)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.trainable_state().items()}
    if head.draft_vocab is not None:
        state[VOCAB_KEY] = head.draft_vocab.detach().to("cpu").contiguous()
        meta["draft_vocab_size"] = len(head.draft_vocab)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(state, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    tmp.replace(path)


def load_exit_head(spec: str, exit_layer: int, norm: nn.Module, lm_head: nn.Module, *,
                   model_dir: Path | None = None, config=None) -> ExitHead:
    """'lm', or a trained head file (checked against model_dir and exit_layer)."""
    if spec == "lm":
        return LMExitHead(exit_layer, norm, lm_head)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"head: not 'lm' and not a file: {spec}")
    meta = read_head_meta(path)
    if model_dir is None:
        raise ValueError("head: loading a trained head needs model_dir to check its fingerprint")
    check_head_meta(meta, Path(model_dir), exit_layer, path)
    if config is None:
        config = AutoConfig.from_pretrained(model_dir)
    head = build_head(meta["head_type"], exit_layer, norm, lm_head, config)
    state = load_file(path)
    state.pop(VOCAB_KEY, None)
    dtype = lm_head.weight.dtype
    missing, unexpected = head.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.startswith("lm_head.") and "rotary_emb" not in k]
    if missing or unexpected:
        raise HeadMismatch(f"head: {path}: weights do not fit a {meta['head_type']} head "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    head.set_draft_vocab(read_draft_vocab(path, meta, lm_head.weight.shape[0]))
    return head.eval()


def shipped_heads() -> list[Path]:
    return sorted(SHIPPED_DIR.glob("*.safetensors"))


def find_shipped_head(model_dir: Path, exit_layer: int) -> Path | None:
    """The shipped head for (this model, this exit layer) with the best validation acceptance."""
    fp = model_fingerprint(model_dir)
    best = None
    for path in shipped_heads():
        try:
            meta = read_head_meta(path)
        except HeadMismatch:
            continue
        if meta.get("model_fingerprint") == fp and meta.get("exit_layer") == exit_layer:
            score = meta.get("val_greedy_acceptance") or 0.0
            if best is None or score > best[0]:
                best = (score, path)
    return best[1] if best else None


def describe_head(spec: str) -> str:
    """'lm', or a head file's name with its recorded validation acceptance (for reports)."""
    if spec == "lm":
        return "lm"
    meta = read_head_meta(spec)
    vocab = f", draft vocabulary {meta['draft_vocab_size']}" if meta.get("draft_vocab_size") else ""
    return f"{Path(spec).name} (val greedy acceptance {meta.get('val_greedy_acceptance')}{vocab})"
