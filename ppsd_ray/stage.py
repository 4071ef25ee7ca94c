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
That takes linears whose rows do not depend on the batch (kv.batch_invariant):
a batched stage runs all rows as one oneDNN product where that kernel keeps one
reduction order (probed at start), else in tiles of measured row counts; either
costs a lone decode token more than the 1-row kernel (packed: 1.5x a step on an
Intel Xeon); a stage built with `batched=False` expects one sequence at a time
and runs every row with the 1-row kernel, as transformers computes a lone token
(rows of several sequences in one bmm of 1-row products: slower than a tile,
still each row's result alone).

KV caches (kv.KVManager) are per sequence id and always hold exactly the positions
before the call's `pos`: a call at `pos` first drops entries >= pos. That drop is the
rollback; `rollback()` only raises the sequence's epoch, so that calls queued
before the rollback are skipped without computing, and a running forward stops at
its next layer once every call in it is stale (a stale call in a batch with live
ones is computed and dropped). An exit head that attends (type 'layer') keeps its
own cache per sequence under the same rule.

Online learning (ppsd_ray/online.py): stage 1 holds its exit heads by version. A
sequence drafts with the version current at its first call to the end, so its seeded
sampled output never depends on when a new version is installed (`install_head`);
a version no sequence uses any more is dropped. With `learn_positions`, stage 1
also keeps per sequence the exit hidden state and input token of every position,
cut back like its cache; at release the positions before `keep` are the committed
ones, and the sequence waits for `take_samples` as hidden states with the next
token as target where the model wrote it (a head that attends keeps the prompt's
hidden states as its context, any other only the last one; never a prompt token).
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
from .kv import (KVManager, PackedBatch, SeqKV, batch_invariant, call_rows, release_freed_memory,
                 use_packed_attention, use_torch_threads)
from .protocol import Hop, Samples, StageReport, Verdict, Work
from .sampling import propose, verify


class Stage:
    def __init__(self, model_dir: Path, start: int, stop: int, *, index: int = 0, num_stages: int = 1,
                 head: str = "lm", exit_layer: int | None = None, dtype: str = "float32",
                 device: str = "cpu", batched: bool = True, head_version: int = 0, learn_positions: int = 0):
        """head_version: the version number of `head` (online learning); learn_positions: with online
        learning, the most committed positions held for take_samples (0: none recorded)."""
        self.index, self.start, self.stop = index, start, stop
        self.batched = batched
        self.first, self.last = index == 0, index == num_stages - 1
        self.device = torch.device(device)
        self.model_dir, self.exit_layer = Path(model_dir), exit_layer or stop
        self.config, self.body, final_norm, lm_head = self._build(self.model_dir, getattr(torch, dtype))
        # transformers 5.24 renamed past_key_values to cache
        params = inspect.signature(self.body.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.lm_head = lm_head if self.last else None
        self._head_parts = (final_norm, lm_head)
        self._heads: dict[int, ExitHead] = {}  # stage 1: exit heads by version
        self.head_version: int | None = None  # the version new sequences draft with
        self._pinned: dict[str, int] = {}  # sequence -> the head version it drafts with
        for part in (self.body, self.lm_head):
            if part is not None:
                self._prepare(part)
        if self.first and not self.last:
            self._heads[head_version] = self._load_head(head)
            self.head_version = head_version
        self.kv = KVManager(stop - start, head_layers=1 if self.exit_head and self.exit_head.needs_cache else 0)
        self.learn_positions = learn_positions if self.exit_head is not None else 0
        self._recorded: dict[str, _Recorded] = {}
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # released sequences waiting for take_samples
        self._epochs: dict[str, int] = {}
        # stage 1: (epoch, position, token) of its newest draft; a later epoch (a rollback, or a
        # request resumed after a repair, perhaps as pp) never takes a draft of an earlier one
        self._drafts: dict[str, tuple[int, int, int]] = {}
        self._stats: dict[str, _SeqStats] = {}
        self._lock = threading.Lock()
        self._running: list[Work] | None = None  # the calls computing now, checked between layers
        self.between_layers = None  # a transport's inbox drain: rollbacks arrive while a call runs
        self._started = 0.0
        for layer in self.body.layers:
            layer.register_forward_pre_hook(self._check_stale)

    @property
    def exit_head(self) -> ExitHead | None:
        """Stage 1's current exit head: the one new sequences draft with."""
        return self._heads.get(self.head_version)

    def _load_head(self, spec: str) -> ExitHead:
        head = load_exit_head(spec, self.exit_layer, *self._head_parts, model_dir=self.model_dir).to(self.device)
        for part in (head, getattr(head, "body", None)):
            if part is not None:
                self._prepare(part)
        return head

    def _prepare(self, part: torch.nn.Module) -> None:
        """Batch-invariant linears (packed or in tiles, or row by row for one sequence at a time), packed
        attention for a model's layers."""
        batch_invariant(part, one_row=not self.batched)
        release_freed_memory()
        if hasattr(part, "config") and hasattr(part, "layers"):
            use_packed_attention(part)

    def install_head(self, version: int, path: str) -> None:
        """Head `version` (a head file, checked against the model and exit layer) drafts for the
        sequences that start from now on; the running ones keep the version they started with.
        Loaded first, then swapped in under the lock, between stage steps."""
        if self.exit_head is None:
            raise ValueError(f"stage {self.index}: has no exit head to replace")
        head = self._load_head(path)
        if head.needs_cache != self.exit_head.needs_cache:  # the head caches are laid out at start
            raise ValueError(f"head: {path} is a '{head.kind}' head; stage 1 serves a '{self.exit_head.kind}' "
                             "head and keeps caches for one kind")
        with self._lock:
            self._heads[version] = head
            self.head_version = version
            self._drop_unused_heads()

    def _drop_unused_heads(self) -> None:
        used = set(self._pinned.values()) | {self.head_version}
        for version in [v for v in self._heads if v not in used]:
            del self._heads[version]

    def take_samples(self) -> Samples:
        """The committed sequences released since the last call."""
        with self._lock:
            taken, self._samples = self._samples, []
        return Samples([h for h, _ in taken], [t for _, t in taken], self.head_version)

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
        use_torch_threads()
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
                if self.head_version is not None:
                    self._pinned.setdefault(seq, self.head_version)
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
                   else [self._drafts[w.seq_id][2]] for w, hop in batch]
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
            if self.learn_positions:
                self._record(works, ids, parts, drafts)
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
        """Stage 1's exit heads: one draft per drafting call from its last position, in one pass
        per head version; eesd's chained drafts each run as the next position right away, one
        call at a time. A trailing draft waits for the next call (ppsd: stage 1's own draft)."""
        by_version: dict[int, list[int]] = {}
        for j, w in enumerate(works):
            by_version.setdefault(self._pinned[w.seq_id], []).append(j)
        for version, group in by_version.items():
            self._draft_with(self._heads[version], group, works, parts, sizes, caches, drafts, dists)

    def _draft_with(self, head: ExitHead, group: list[int], works, parts, sizes, caches, drafts, dists) -> None:
        """The calls `group` (indices into the batch) drafting with `head`."""
        if head.needs_cache:  # an attending head sees every position, drafted or not
            heads = [self.kv.head_at(works[j].seq_id, works[j].pos, f"stage {self.index}") for j in group]
            group_sizes = [sizes[j] for j in group]
            with call_rows(group_sizes):
                feats = head.features(torch.cat([parts[j] for j in group], dim=1),
                                      self._positions([works[j].pos for j in group], group_sizes),
                                      PackedBatch(heads, group_sizes)).split(group_sizes, dim=1)
            last = {j: f[:, -1:] for j, f in zip(group, feats)}
        drafting = [j for j in group if works[j].chain + works[j].draft > 0]
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
                self._drafts[seq] = (work.epoch, pos + n, token)
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

    def _record(self, works, ids, parts, drafts) -> None:
        """Online learning: each call's exit hidden states and input tokens (eesd: its chained
        drafts too), by position from 0, cut back to the call's position like the cache."""
        for work, tokens, part, drafted in zip(works, ids, parts, drafts):
            rec = self._recorded.get(work.seq_id)
            if work.pos == 0:
                rec = self._recorded[work.seq_id] = _Recorded([], [])
            if rec is None or work.pos > len(rec.hidden):  # nothing recorded to continue (a stage restarted)
                self._recorded.pop(work.seq_id, None)
                continue
            if work.prompt:
                rec.prompt_len = work.pos + len(tokens)
            del rec.hidden[work.pos:], rec.tokens[work.pos:]
            rec.hidden.extend(part[0].to("cpu", torch.float16).unbind(0))
            rec.tokens.extend([*tokens, *drafted[:work.chain]])

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
        recorded = self._recorded.pop(seq_id, None)
        with self._lock:
            self.kv.release(seq_id)
            self._epochs.pop(seq_id, None)
            self._drafts.pop(seq_id, None)
            stats.report.head_version = self._pinned.pop(seq_id, None)
            self._drop_unused_heads()
            if recorded is not None:
                self._keep_samples(recorded, keep, self.exit_head.needs_cache)
        report = stats.report
        report.stale_s += sum(stats.spent[keep:])
        if not events:
            report.events = []
        return report

    def _keep_samples(self, recorded: "_Recorded", keep: int, attends: bool) -> None:
        """The positions before `keep` are committed: position p's hidden state, with the token at
        p + 1 as its target from the prompt's last position on (-1 before it). A head that attends
        keeps every position (its context), any other from the prompt's last. The oldest sequences
        go when more than learn_positions positions wait."""
        n = min(keep, len(recorded.tokens)) - 1
        first = 0 if attends else recorded.prompt_len - 1
        if n <= recorded.prompt_len - 1:
            return
        targets = torch.tensor(recorded.tokens[1:n + 1])
        targets[:recorded.prompt_len - 1] = -1
        self._samples.append((torch.stack(recorded.hidden[first:n]), targets[first:]))
        waiting = sum(len(t) for _, t in self._samples)
        while waiting > self.learn_positions:
            waiting -= len(self._samples.pop(0)[1])

    def busy_s(self) -> float:
        """How long the forward computing now has been running (0 when idle): names a hung stage."""
        return time.perf_counter() - self._started if self._running is not None else 0.0

    def sequences(self) -> list[str]:
        """Sequences holding state here (empty once every request has ended)."""
        with self._lock:
            return sorted(set(self.kv.layers) | set(self._epochs) | set(self._stats) | set(self._pinned)
                          | set(self._recorded))

    def _has_own_input(self, work: Work) -> bool:
        """Stage 1 needs no hop when the call brings its tokens or it drafted this position itself."""
        return self.first and (work.tokens is not None
                               or self._drafts.get(work.seq_id, (None, None))[:2] == (work.epoch, work.pos))

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


@dataclass
class _Recorded:
    """Online learning: a sequence's exit hidden state and input token at each position."""
    hidden: list[torch.Tensor]
    tokens: list[int]
    prompt_len: int = 0


class _Stale(Exception):
    """Raised between layers when every call of the running forward was rolled back."""


@dataclass
class _SeqStats:
    report: StageReport
    spent: list[float] = field(default_factory=list)  # seconds per cached position
