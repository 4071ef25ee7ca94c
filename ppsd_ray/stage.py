"""One pipeline stage: a contiguous range of decoder layers and their KV caches.

A Stage is plain PyTorch, no Ray: the schedule drives it in-process in tests,
and actors.stage.StageActor wraps it unchanged. The layers are transformers'
own model class, built for just this range (config.num_hidden_layers = stop -
start) and given only this range's weights from the safetensors files; what
differs by model family (checkpoint names, embedding scales, logit transforms,
caches that roll back past a sliding window) lives in families.py.

Hidden states flow (protocol.py): stage 1 embeds token ids and runs layers
[0, E); its exit head proposes the draft (sampling.propose), which travels on in
the Hop with the hidden state. Every later stage takes the Hop of the stage
before. The last stage applies the final norm and LM head, verifies the drafts
(sampling.verify) and answers with the Verdict. In pp, stage 1's input is the
last stage's Verdict of the call before: the pipeline is a ring.

KV caches are per sequence id and always hold exactly the positions before the
call's `pos`: a call at `pos` first drops entries >= pos. That drop is the
rollback; `rollback()` only raises the sequence's epoch, so that calls queued
before the rollback are skipped without computing, and a call already running
stops at its next layer. An exit head that attends (type 'layer') keeps its own
cache per sequence under the same rule.
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
from .protocol import Hop, StageReport, Verdict, Work
from .sampling import propose, verify


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
        self._stats: dict[str, _SeqStats] = {}
        self._lock = threading.Lock()
        self._running: Work | None = None  # the call computing now, checked between layers
        self.between_layers = None  # a transport's inbox drain: rollbacks arrive while a call runs
        self._started = 0.0
        for layer in self.body.layers:
            layer.register_forward_pre_hook(self._check_stale)

    def _build(self, model_dir: Path, dtype):
        """Transformers' own model class for this stage's layers (ppsd_ray/families.py);
        stage 1 also gets the norm and LM head, which its exit head may share."""
        shard = build_shard(model_dir, self.start, self.stop, embed=self.first, head=self.first or self.last,
                            dtype=dtype, device=self.device)
        return shard.config, shard.body, shard.final_norm, shard.lm_head

    # The three calls of the protocol (ppsd_ray/protocol.py).

    @torch.inference_mode()
    def forward(self, work: Work, hop: Hop | Verdict | None = None) -> Hop | Verdict | None:
        """Runs one call. Stage 1 takes work.tokens, or its own newest draft, or in pp the
        token of the Verdict it is given (`hop`: the last stage's, fed round to it); later
        stages take the previous stage's Hop. Returns the Hop for the next stage, the Verdict
        on the last one, or None when the call is stale (rolled back, released, or its input
        never came: skipped upstream): then nothing is computed, or what had started stops
        between layers."""
        seq = work.seq_id
        with self._lock:
            stale = (work.epoch < self._epochs.get(seq, 0) or (work.pos > 0 and seq not in self._caches)
                     or (hop is None and not self._has_own_input(work)))
            if not stale:
                self._epochs[seq] = work.epoch
        if stale:
            if seq in self._stats:
                self._stats[seq].report.skipped += 1
            return None
        stats = self._stats.get(seq) or self._stats.setdefault(seq, _SeqStats(StageReport(index=self.index)))
        t0, wall0 = time.perf_counter(), time.time()
        self._running, self._started = work, t0
        try:
            out, n = self._run(work, hop, stats)
        except _Stale:
            out, n = None, 0
        finally:
            self._running = None
        dt = time.perf_counter() - t0
        report = stats.report
        if out is None:  # stopped between layers: all of it was stale work
            report.skipped += 1
            report.stale_s += dt
            report.stopped_s += dt
            report.compute_s += dt
            return None
        if not report.calls:
            report.prefill_s = dt
        report.compute_s += dt
        report.calls += 1
        stats.spent[work.pos:] = [dt / n] * n
        report.events.append((wall0, wall0 + dt, work.pos, n))
        return out

    def _run(self, work: Work, hop: Hop | Verdict | None, stats: "_SeqStats"):
        seq, pos = work.seq_id, work.pos
        cache = self._cache_at(seq, pos, stats)
        if self.first:
            ids = (list(work.tokens) if work.tokens is not None else [hop.tokens[-1]] if hop is not None
                   else [self._drafts[seq][1]])
            drafts, dists = [], None
            x = self.body.embed_tokens(torch.tensor([ids], device=self.device))
        else:
            drafts, dists = hop.drafts, hop.draft_dists
            x = hop.hidden.to(self.device)
        out, n = self._layers(x, pos, cache), x.shape[1]
        if self.first and not self.last:
            # each chained draft runs as the next position right away (eesd); a trailing
            # draft waits for the next call (ppsd: stage 1's own draft, work.tokens None)
            hidden, dists = [out], (None if work.sampling.greedy else [])
            feats = self._head_features(seq, out, pos, work.chain + work.draft > 0)
            for i in range(work.chain + work.draft):
                logits, vocab = self.exit_head.draft_logits(feats[:, -1:])
                token, dist = propose(logits[0, -1], work.sampling, pos + n, work.epoch, vocab)
                self._drafts[seq] = (pos + n, token)
                drafts.append(token)
                if dists is not None:
                    dists.append(dist)
                if i == work.chain:
                    break
                out = self._layers(self.body.embed_tokens(torch.tensor([[token]], device=self.device)),
                                   pos + n, cache)
                hidden.append(out)
                feats = self._head_features(seq, out, pos + n, True)
                n += 1
            out = torch.cat(hidden, dim=1) if len(hidden) > 1 else out
        if not self.last:
            return Hop(work, out.cpu() if self.device.type == "cpu" else out, drafts, dists), n
        logits = self.lm_head(out[0, -work.verify:])
        first = pos + n - work.verify + 1  # the position of the token that row 0 decides
        tokens, accepted, logprobs = verify(logits, first, drafts, dists, work.sampling, work.epoch)
        return Verdict(seq, work.epoch, pos, tokens, len(drafts), accepted, logprobs), n

    def _layers(self, x: torch.Tensor, pos: int, cache) -> torch.Tensor:
        return self.body(inputs_embeds=x, position_ids=self._positions(pos, x.shape[1]), use_cache=True,
                         **{self._cache_kw: cache}).last_hidden_state

    def _positions(self, pos: int, n: int) -> torch.Tensor:
        return torch.arange(pos, pos + n, device=self.device)[None]

    def _head_features(self, seq: str, out: torch.Tensor, pos: int, needed: bool):
        """The exit head's features for positions pos.. of `out`. An attending head sees every
        position, drafted or not, so its cache follows the layer caches exactly."""
        if self.exit_head.needs_cache:
            n = out.shape[1]
            return self.exit_head.features(out, self._positions(pos, n), self._head_cache_at(seq, pos))
        return self.exit_head.features(out[:, -1:]) if needed else None

    def _check_stale(self, module, args):
        """Between layers: a call whose sequence was rolled back meanwhile stops here."""
        if self.between_layers is not None:
            self.between_layers()
        work = self._running
        if work is not None and work.epoch < self._epochs.get(work.seq_id, 0):
            raise _Stale

    def rollback(self, seq_id: str, epoch: int) -> None:
        """Calls of this sequence with an older epoch are stale from now on. A sequence not
        held (already released: on Ray a rollback may overtake its release) is left alone."""
        with self._lock:
            if seq_id in self._epochs:
                self._epochs[seq_id] = max(epoch, self._epochs[seq_id])

    def release(self, seq_id: str, keep: int, events: bool = False) -> StageReport:
        """Ends a sequence; positions >= keep count as stale work. Returns its report,
        with the timeline of computed calls if `events`."""
        stats = self._stats.pop(seq_id, None) or _SeqStats(StageReport(index=self.index))
        with self._lock:
            self._caches.pop(seq_id, None)
            self._head_caches.pop(seq_id, None)
            self._epochs.pop(seq_id, None)
            self._drafts.pop(seq_id, None)
        report = stats.report
        report.stale_s += sum(stats.spent[keep:])
        if not events:
            report.events = []
        return report

    def busy_s(self) -> float:
        """How long the call computing now has been running (0 when idle): names a hung stage."""
        return time.perf_counter() - self._started if self._running is not None else 0.0

    def sequences(self) -> list[str]:
        """Sequences holding state here (empty once every request has ended)."""
        with self._lock:
            return sorted(set(self._caches) | set(self._epochs) | set(self._stats))

    def _has_own_input(self, work: Work) -> bool:
        """Stage 1 needs no hop when the call brings its tokens or it drafted this position itself."""
        return self.first and (work.tokens is not None or self._drafts.get(work.seq_id, (None,))[0] == work.pos)

    def waits(self, work: Work) -> bool:
        """A live call that cannot run yet: stage 1's token for it still has to come round
        from the last stage (pp). A stale call does not wait: it is skipped."""
        return self.first and self.live(work.seq_id, work.epoch) and not self._has_own_input(work)

    def live(self, seq_id: str, epoch: int) -> bool:
        """The sequence is held here and `epoch` is not rolled back."""
        return seq_id in self._caches and epoch >= self._epochs.get(seq_id, 0)

    def _cache_at(self, seq_id: str, pos: int, stats: "_SeqStats") -> StageCache:
        """The sequence's cache holding exactly positions < pos: later entries (rolled back, or
        left by a call stopped between layers) are dropped."""
        cache = self._caches.get(seq_id)
        if cache is None:
            cache = self._caches[seq_id] = new_cache(self.config)
        held = cache.get_seq_length()
        if held > pos:
            cache.crop(pos)
            stats.report.stale_s += sum(stats.spent[pos:])
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



class _Stale(Exception):
    """Raised between layers when the running call was rolled back."""


@dataclass
class _SeqStats:
    report: StageReport
    spent: list[float] = field(default_factory=list)  # seconds per cached position
