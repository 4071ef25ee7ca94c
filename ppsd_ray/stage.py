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

A stage step runs the ready calls of several sequences as one forward
(`forward_batch`): their tokens are packed into one row, each call with its own
positions and its own sequence's KV cache (ppsd_ray.kv). One call alone takes the
same path, so a sequence's tokens do not depend on what else is in the batch.
That takes linears whose rows do not depend on the batch (kv.batch_invariant),
which costs a lone decode token about 10% here (a 2-row kernel, not the 1-row
one); a stage built with `batched=False` only ever holds one sequence and keeps
the model's own linears, as transformers computes them.

KV caches (kv.KVManager) are per sequence id and always hold exactly the positions
before the call's `pos`: a call at `pos` first drops entries >= pos. That drop is the
rollback; `rollback()` only raises the sequence's epoch, so that calls queued
before the rollback are skipped without computing, and a running forward stops at
its next layer once every call in it is stale (a stale call in a batch with live
ones is computed and dropped). An exit head that attends (type 'layer') keeps its
own cache per sequence under the same rule.
"""
from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import build_shard
from .heads import ExitHead, load_exit_head
from .kv import KVManager, PackedBatch, SeqKV, batch_invariant, call_rows, use_packed_attention
from .protocol import Hop, StageReport, Verdict, Work
from .sampling import propose, verify


class Stage:
    def __init__(self, model_dir: Path, start: int, stop: int, *, index: int = 0, num_stages: int = 1,
                 head: str = "lm", exit_layer: int | None = None, dtype: str = "float32",
                 device: str = "cpu", batched: bool = True):
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
        for part in (self.body, self.lm_head, self.exit_head, getattr(self.exit_head, "body", None)):
            if part is not None:
                if batched:
                    batch_invariant(part)
                if hasattr(part, "config") and hasattr(part, "layers"):
                    use_packed_attention(part)
        self.kv = KVManager(stop - start, head_layers=1 if self.exit_head and self.exit_head.needs_cache else 0)
        self._epochs: dict[str, int] = {}
        self._drafts: dict[str, tuple[int, int]] = {}  # stage 1: (position, token) of its newest draft
        self._stats: dict[str, _SeqStats] = {}
        self._lock = threading.Lock()
        self._running: list[Work] | None = None  # the calls computing now, checked between layers
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

    def forward(self, work: Work, hop: Hop | Verdict | None = None) -> Hop | Verdict | None:
        """One call alone: forward_batch of one."""
        return self.forward_batch([(work, hop)])[0]

    @torch.inference_mode()
    def forward_batch(self, calls: list[tuple[Work, Hop | Verdict | None]]) -> list[Hop | Verdict | None]:
        """Runs the calls, at most one per sequence, as one forward. Stage 1 takes work.tokens,
        or its own newest draft, or in pp the token of the Verdict it is given (the last
        stage's, fed round to it); later stages take the previous stage's Hop. Returns per
        call the Hop for the next stage, the Verdict on the last one, or None when the call
        is stale (rolled back, released, or its input never came: skipped upstream): then
        nothing is computed for it, or what was computed is dropped."""
        outs: list = [None] * len(calls)
        live = []
        with self._lock:
            for i, (work, hop) in enumerate(calls):
                seq = work.seq_id
                if (work.epoch < self._epochs.get(seq, 0) or (work.pos > 0 and seq not in self.kv)
                        or (hop is None and not self._has_own_input(work))):
                    if seq in self._stats:
                        self._stats[seq].report.skipped += 1
                    continue
                self._epochs[seq] = work.epoch
                live.append(i)
        if not live:
            return outs
        batch = [calls[i] for i in live]
        works = [work for work, _ in batch]
        stats = [self._stats.get(w.seq_id) or self._stats.setdefault(w.seq_id, _SeqStats(StageReport(index=self.index)))
                 for w in works]
        t0, wall0 = time.perf_counter(), time.time()
        self._running, self._started = works, t0
        try:
            results = self._run(batch, stats)
        except _Stale:
            results = [(None, 0)] * len(batch)
        finally:
            self._running = None
        dt = time.perf_counter() - t0
        share = dt / len(batch)  # each call's part of the step
        for i, work, (out, n), st in zip(live, works, results, stats):
            report = st.report
            report.compute_s += share
            if out is None or work.epoch < self._epochs.get(work.seq_id, 0):  # stale by now: dropped
                report.skipped += 1
                report.stale_s += share
                report.stopped_s += share if out is None else 0.0
                continue
            if not report.calls:
                report.prefill_s = share
            report.calls += 1
            st.spent[work.pos:] = [share / n] * n
            report.events.append((wall0, wall0 + dt, work.pos, n))
            outs[i] = out
        return outs

    def _run(self, batch: list[tuple[Work, Hop | Verdict | None]], stats: list["_SeqStats"]) -> list[tuple]:
        works = [work for work, _ in batch]
        caches = [self._cache_at(w.seq_id, w.pos, st) for w, st in zip(works, stats)]
        if self.first:
            ids = [list(w.tokens) if w.tokens is not None else [hop.tokens[-1]] if hop is not None
                   else [self._drafts[w.seq_id][1]] for w, hop in batch]
            sizes = [len(i) for i in ids]
            x = self.body.embed_tokens(torch.tensor([sum(ids, [])], device=self.device))
        else:
            sizes = [hop.hidden.shape[1] for _, hop in batch]
            x = torch.cat([hop.hidden.to(self.device) for _, hop in batch], dim=1)
        out = self._layers(x, [w.pos for w in works], sizes, caches)
        parts = list(out.split(sizes, dim=1))
        drafts: list[list[int]] = [[] if self.first else hop.drafts for _, hop in batch]
        dists: list = [None if self.first or w.sampling.greedy else hop.draft_dists for w, (_, hop) in zip(works, batch)]
        if self.first and not self.last:
            self._draft(works, parts, sizes, caches, drafts, dists)
        if not self.last:
            return [(Hop(w, p.cpu() if self.device.type == "cpu" else p, d, q), p.shape[1])
                    for w, p, d, q in zip(works, parts, drafts, dists)]
        rows = [p[0, p.shape[1] - w.verify:] for w, p in zip(works, parts)]
        with call_rows([w.verify for w in works if w.verify]):
            logits = self.lm_head(torch.cat(rows)) if any(w.verify for w in works) else None
        results, at = [], 0
        for w, p, d, q in zip(works, parts, drafts, dists):
            n = p.shape[1]
            first = w.pos + n - w.verify + 1  # the position of the token that row 0 decides
            tokens, accepted, logprobs = (verify(logits[at:at + w.verify], first, d, q, w.sampling, w.epoch)
                                          if w.verify else ([], 0, None))
            at += w.verify
            results.append((Verdict(w.seq_id, w.epoch, w.pos, tokens, len(d), accepted, logprobs), n))
        return results

    def _draft(self, works, parts, sizes, caches, drafts, dists) -> None:
        """Stage 1's exit head: one draft per drafting call from its last position, all in one
        pass; eesd's chained drafts each run as the next position right away, one call at a
        time. A trailing draft waits for the next call (ppsd: stage 1's own draft)."""
        head = self.exit_head
        if head.needs_cache:  # an attending head sees every position, drafted or not
            heads = [self.kv.head_at(w.seq_id, w.pos, f"stage {self.index}") for w in works]
            with call_rows(sizes):
                feats = head.features(torch.cat(parts, dim=1), self._positions([w.pos for w in works], sizes),
                                      PackedBatch(heads, sizes)).split(sizes, dim=1)
            last = [f[:, -1:] for f in feats]
        drafting = [j for j, w in enumerate(works) if w.chain + w.draft > 0]
        if not drafting:
            return
        rows = torch.cat([last[j] for j in drafting] if head.needs_cache else [parts[j][:, -1:] for j in drafting], 1)
        with call_rows([1] * len(drafting)):
            logits, vocab = head.draft_logits(rows if head.needs_cache else head.features(rows))
        for r, j in enumerate(drafting):
            work, row = works[j], logits[0, r]
            seq, pos, n = work.seq_id, work.pos, sizes[j]
            hidden = [parts[j]]
            if not work.sampling.greedy:
                dists[j] = []
            for i in range(work.chain + work.draft):
                token, dist = propose(row, work.sampling, pos + n, work.epoch, vocab)
                self._drafts[seq] = (pos + n, token)
                drafts[j].append(token)
                if dists[j] is not None:
                    dists[j].append(dist)
                if i == work.chain:
                    break
                h = self._layers(self.body.embed_tokens(torch.tensor([[token]], device=self.device)), [pos + n], [1],
                                 [caches[j]])
                hidden.append(h)
                f = (head.features(h, self._positions([pos + n], [1]),
                                   PackedBatch([self.kv.head_at(seq, pos + n)], [1]))
                     if head.needs_cache else head.features(h))
                row = head.draft_logits(f)[0][0, -1]
                n += 1
            parts[j] = torch.cat(hidden, dim=1) if len(hidden) > 1 else parts[j]

    def _layers(self, x: torch.Tensor, starts: list[int], sizes: list[int], caches: list[SeqKV]) -> torch.Tensor:
        with call_rows(sizes):
            return self.body(inputs_embeds=x, position_ids=self._positions(starts, sizes), use_cache=True,
                             **{self._cache_kw: PackedBatch(caches, sizes)}).last_hidden_state

    def _positions(self, starts: list[int], sizes: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(p, p + n, device=self.device) for p, n in zip(starts, sizes)])[None]

    def _check_stale(self, module, args):
        """Between layers: a forward whose every call was rolled back meanwhile stops here."""
        if self.between_layers is not None:
            self.between_layers()
        works = self._running
        if works and all(w.epoch < self._epochs.get(w.seq_id, 0) for w in works):
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
            self.kv.release(seq_id)
            self._epochs.pop(seq_id, None)
            self._drafts.pop(seq_id, None)
        report = stats.report
        report.stale_s += sum(stats.spent[keep:])
        if not events:
            report.events = []
        return report

    def busy_s(self) -> float:
        """How long the forward computing now has been running (0 when idle): names a hung stage."""
        return time.perf_counter() - self._started if self._running is not None else 0.0

    def sequences(self) -> list[str]:
        """Sequences holding state here (empty once every request has ended)."""
        with self._lock:
            return sorted(set(self.kv.layers) | set(self._epochs) | set(self._stats))

    def _has_own_input(self, work: Work) -> bool:
        """Stage 1 needs no hop when the call brings its tokens or it drafted this position itself."""
        return self.first and (work.tokens is not None or self._drafts.get(work.seq_id, (None,))[0] == work.pos)

    def waits(self, work: Work) -> bool:
        """A live call that cannot run yet: stage 1's token for it still has to come round
        from the last stage (pp). A stale call does not wait: it is skipped."""
        return self.first and self.live(work.seq_id, work.epoch) and not self._has_own_input(work)

    def live(self, seq_id: str, epoch: int) -> bool:
        """The sequence is held here and `epoch` is not rolled back."""
        return seq_id in self.kv and epoch >= self._epochs.get(seq_id, 0)

    def _cache_at(self, seq_id: str, pos: int, stats: "_SeqStats") -> SeqKV:
        """The sequence's cache holding exactly positions < pos; what a dropped entry cost is stale."""
        cache, dropped = self.kv.at(seq_id, pos, f"stage {self.index}")
        if dropped:
            stats.report.stale_s += sum(stats.spent[pos:])
            del stats.spent[pos:]
        return cache


class _Stale(Exception):
    """Raised between layers when every call of the running forward was rolled back."""


@dataclass
class _SeqStats:
    report: StageReport
    spent: list[float] = field(default_factory=list)  # seconds per cached position
