"""One pipeline stage: a contiguous range of decoder layers and their KV caches.

A Stage is plain PyTorch, no Ray: the schedule drives it in-process in tests,
and actors.stage.StageActor wraps it unchanged. The layers are transformers'
own model class, built for just this range (config.num_hidden_layers = stop -
start) and given only this range's weights from the safetensors files; what
differs by model family (checkpoint names, embedding scales, logit transforms,
caches that roll back past a sliding window) lives in families.py.

Hidden states flow: stage 1 embeds token ids and runs layers [0, E); its exit
head turns the result into draft tokens. Every later stage takes the hidden
state of the stage before. The last stage applies the final norm and LM head
and returns the verified (argmax) tokens.

KV caches are per sequence id and always hold exactly the positions before the
call's `pos`: a call at `pos` first drops entries >= pos. That drop is the
rollback; `rollback()` only raises the sequence's epoch, so that calls queued
before the rollback are skipped without computing. An exit head that attends
(type 'layer') keeps its own cache per sequence under the same rule.
"""
from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import StageCache, build_shard, new_cache
from .heads import ExitHead, load_exit_head
from .schedule import OWN_DRAFT


@dataclass
class StageStats:
    """Per sequence: seconds computing (the first call, the prefill, also alone), seconds
    on positions later rolled back, calls, and each computed call's (start, end, pos, n)."""
    compute_s: float = 0.0
    prefill_s: float = 0.0
    stale_s: float = 0.0
    calls: int = 0
    skipped: int = 0
    spent: list[float] = field(default_factory=list)  # seconds per cached position
    events: list[tuple[float, float, int, int]] = field(default_factory=list)

    def summary(self, events: bool) -> dict:
        out = {"compute_s": self.compute_s, "prefill_s": self.prefill_s, "stale_s": self.stale_s,
               "calls": self.calls, "skipped": self.skipped}
        if events:
            out["events"] = self.events
        return out


class Stage:
    def __init__(self, model_dir: Path, start: int, stop: int, *, index: int = 0, num_stages: int = 1,
                 head: str = "lm", exit_layer: int | None = None, dtype: str = "float32",
                 device: str = "cpu"):
        self.index, self.start, self.stop = index, start, stop
        self.first, self.last = index == 0, index == num_stages - 1
        self.device = torch.device(device)
        self.config, self.body, final_norm, lm_head = self._build(Path(model_dir), getattr(torch, dtype))
        # transformers 5.24 renamed past_key_values to cache
        params = inspect.signature(self.body.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.lm_head = lm_head if self.last else None
        self.exit_head: ExitHead | None = None
        if self.first and not self.last:
            self.exit_head = load_exit_head(head, exit_layer or stop, final_norm, lm_head,
                                            model_dir=Path(model_dir)).to(self.device)
        self._caches: dict[str, StageCache] = {}
        self._head_caches: dict[str, StageCache] = {}  # exit heads that attend (type 'layer')
        self._epochs: dict[str, int] = {}
        self._drafts: dict[str, tuple[int, int]] = {}  # stage 1: (position, token) of its newest draft
        self._stats: dict[str, StageStats] = {}
        self._lock = threading.Lock()

    def _build(self, model_dir: Path, dtype):
        """Transformers' own model class for this stage's layers (ppsd_ray/families.py);
        stage 1 also gets the norm and LM head, which its exit head may share."""
        shard = build_shard(model_dir, self.start, self.stop, embed=self.first, head=self.first or self.last,
                            dtype=dtype, device=self.device)
        return shard.config, shard.body, shard.final_norm, shard.lm_head

    # The three calls the schedule makes.

    @torch.inference_mode()
    def forward(self, seq_id: str, epoch: int, pos: int, *inputs, heads: int = 1):
        """Runs positions pos.. of one sequence. Stage 1 takes token ids (ints, lists
        of ints, or OWN_DRAFT: the draft it made itself in its previous call, so the
        draft chain needs no round trip), later stages hidden states [1, n, H]. Returns (hidden for the next
        stage or None, argmax tokens of the last `heads` positions or None).
        Stale calls (older epoch, skipped input, released sequence) return (None, None)."""
        with self._lock:
            stale = (epoch < self._epochs.get(seq_id, 0) or any(x is None for x in inputs)
                     or (pos > 0 and seq_id not in self._caches))
            if not stale:
                self._epochs[seq_id] = epoch
        if stale:
            if seq_id in self._stats:
                self._stats[seq_id].skipped += 1
            return None, None
        stats = self._stats.setdefault(seq_id, StageStats())
        t0, wall0 = time.perf_counter(), time.time()
        cache = self._cache_at(seq_id, pos, stats)
        if self.first:
            ids = []
            for x in inputs:
                if isinstance(x, str) and x == OWN_DRAFT:
                    x = self._own_draft(seq_id, pos + len(ids))
                ids += [x] if isinstance(x, int) else x
            x = self.body.embed_tokens(torch.tensor([ids], device=self.device))
        else:
            x = torch.cat([h.to(self.device) for h in inputs], dim=1)
        n = x.shape[1]
        position_ids = torch.arange(pos, pos + n, device=self.device)[None]
        out = self.body(inputs_embeds=x, position_ids=position_ids, use_cache=True,
                        **{self._cache_kw: cache}).last_hidden_state
        tokens = None
        if self.exit_head is not None and self.exit_head.needs_cache:
            # an attending head sees every position, drafted or not, so its cache
            # follows the layer caches exactly
            feats = self.exit_head.features(out, position_ids, self._head_cache_at(seq_id, pos))
            if heads:
                tokens = self.exit_head.logits(feats[:, -heads:]).argmax(-1)[0].tolist()
        elif heads:
            head = self.lm_head if self.last else self.exit_head
            if head is not None:
                tokens = head(out[:, -heads:]).argmax(-1)[0].tolist()
        if tokens is not None and not self.last:
            self._drafts[seq_id] = (pos + n, tokens[-1])
        hidden = None if self.last else out.cpu()
        dt = time.perf_counter() - t0
        if not stats.calls:
            stats.prefill_s = dt
        stats.compute_s += dt
        stats.calls += 1
        stats.spent.extend([dt / n] * n)
        stats.events.append((wall0, wall0 + dt, pos, n))
        return hidden, tokens

    def rollback(self, seq_id: str, epoch: int) -> None:
        """Calls of this sequence with an older epoch are stale from now on."""
        with self._lock:
            self._epochs[seq_id] = max(epoch, self._epochs.get(seq_id, 0))

    def release(self, seq_id: str, keep: int, events: bool = False) -> dict:
        """Ends a sequence; positions >= keep count as stale work. Returns its stats,
        with the timeline of computed calls if `events`."""
        stats = self._stats.pop(seq_id, StageStats())
        with self._lock:
            self._caches.pop(seq_id, None)
            self._head_caches.pop(seq_id, None)
            self._epochs.pop(seq_id, None)
            self._drafts.pop(seq_id, None)
        stats.stale_s += sum(stats.spent[keep:])
        return stats.summary(events)

    def _own_draft(self, seq_id: str, pos: int) -> int:
        drafted_at, token = self._drafts.get(seq_id, (None, None))
        if drafted_at != pos:
            raise RuntimeError(f"stage {self.index}: no draft of its own for position {pos} (has {drafted_at})")
        return token

    def _cache_at(self, seq_id: str, pos: int, stats: StageStats) -> StageCache:
        cache = self._caches.get(seq_id)
        if cache is None:
            cache = self._caches[seq_id] = new_cache(self.config)
        held = cache.get_seq_length()
        if held > pos:
            cache.crop(pos)
            stats.stale_s += sum(stats.spent[pos:])
            del stats.spent[pos:]
        elif held < pos:
            raise RuntimeError(f"stage {self.index}: call at position {pos} but only {held} positions cached")
        return cache

    def _head_cache_at(self, seq_id: str, pos: int) -> StageCache:
        """The exit head's cache, under the same rule as the layer caches: entries >= pos dropped."""
        cache = self._head_caches.get(seq_id)
        if cache is None:
            cache = self._head_caches[seq_id] = self.exit_head.new_cache()
        held = cache.get_seq_length()
        if held > pos:
            cache.crop(pos)
        elif held < pos:
            raise RuntimeError(f"stage {self.index}: exit head call at position {pos} but only {held} cached")
        return cache

