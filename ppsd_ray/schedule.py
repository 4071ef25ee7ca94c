"""The token loop: what enters stage 1, what is committed, what is rolled back.

No Ray here. A Decoder drives a list of stage ports, objects with the methods of
ppsd_ray.stage.Stage (forward, rollback, release). A port may answer at once (an
in-process Stage) or with futures (a Ray actor handle's .remote calls); `get`
turns an answer into a value. Hidden states are only ever handed from one
stage's call to the next: the decoder never `get`s one, it reads only token ids.

Modes (see ../shared/PPSD.md):
- ar / pp: one token in the pipe at a time; the verified token enters next.
- ppsd: verify-while-draft. Stage 1's exit head drafts the token for p+1 while
  p moves on down the pipe; the draft enters stage 1 on the next step, up to
  `window` tokens in flight; stage 1 feeds its own draft into its next call
  (OWN_DRAFT), so drafting never waits on the coordinator. When the last stage's verified token for p+1
  differs from the draft that entered at p+1, the verified token is committed,
  every stage is told to skip the stale calls (rollback), and the corrected
  token enters stage 1 at p+1, which drops every stage's KV entries >= p+1.
- eesd: the classic schedule. Stage 1 drafts gamma tokens alone, then the
  other stages verify all of them in one pass; the longest matching prefix
  plus the first correction is committed.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

from .config import GenerationConfig, Mode


@dataclass(frozen=True)
class TokenLogprobs:
    """A committed token with its logprob under the verifier's distribution, and the `top`
    most likely tokens there as (token, logprob), most likely first. Streamed instead of
    the bare token id when GenerationConfig.logprobs is set."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# Stage 1's input "the token you drafted for this position yourself": the draft chain
# stays inside stage 1 instead of travelling to the coordinator and back.
OWN_DRAFT = "own-draft"


class StagePort(Protocol):
    def forward(self, seq_id: str, epoch: int, pos: int, *inputs, heads: int = 1) -> tuple[Any, Any]: ...
    def rollback(self, seq_id: str, epoch: int) -> Any: ...
    def release(self, seq_id: str, keep: int, events: bool = False) -> Any: ...


@dataclass
class RequestStats:
    new_tokens: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    rollbacks: int = 0
    wait_s: float = 0.0  # the coordinator blocked on answers; the rest of wall_s is its own work
    trace: list[bool] = field(default_factory=list)  # per verified draft, in order: accepted?
    stages: list[dict] = field(default_factory=list)  # per stage: compute_s, prefill_s, stale_s, calls, ...

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens, "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
            "drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
            "rollbacks": self.rollbacks, "prefill_s": self.prefill_s, "wait_s": self.wait_s,
            "stage_compute_s": [s["compute_s"] for s in self.stages],
            "stale_s": sum(s["stale_s"] for s in self.stages),
            "stages": self.stages,
            "trace": "".join("1" if a else "0" for a in self.trace),
        }


def accepted_prefix(drafts: Sequence[int], verified: Sequence[int]) -> int:
    """How many leading drafts equal the verified tokens at the same positions."""
    n = 0
    while n < len(drafts) and drafts[n] == verified[n]:
        n += 1
    return n


class Decoder:
    def __init__(self, stages: Sequence[StagePort], get: Callable[[Any], Any] = lambda x: x,
                 eos_token_ids: Sequence[int] = (), window: int | None = None):
        self.stages = list(stages)
        self.get = get
        self.eos = frozenset(eos_token_ids)
        self.window = window or len(self.stages)

    def decode(self, seq_id: str, prompt: Sequence[int], gen: GenerationConfig,
               stats: RequestStats) -> Iterator[int]:
        """Yields each committed token as soon as it is verified; fills `stats`."""
        k = len(self.stages)
        if gen.mode == Mode.ar and k != 1:
            raise ValueError(f"mode: ar runs on a 1-stage pipeline, this one has {k} stages")
        if gen.mode in (Mode.ppsd, Mode.eesd) and k < 2:
            raise ValueError(f"mode: {gen.mode.value} needs at least 2 stages")
        t0 = time.perf_counter()
        committed = 0

        def get(answer):
            t = time.perf_counter()
            value = self.get(answer)
            stats.wait_s += time.perf_counter() - t
            return value

        try:
            loop = self._eesd if gen.mode == Mode.eesd else self._pipelined
            for token in loop(seq_id, list(prompt), gen, stats, t0, get):
                committed += 1
                stats.new_tokens = committed
                yield token
                if committed >= gen.max_new_tokens or (gen.stop_on_eos and token in self.eos):
                    break
        finally:
            stats.wall_s = time.perf_counter() - t0
            # KV is valid for the prompt and every committed token but the newest;
            # calls still queued find the sequence released and are skipped.
            keep = len(prompt) + committed - 1
            answers = [s.release(seq_id, keep, gen.timeline) for s in self.stages]
            try:
                stats.stages = [self.get(a) for a in answers]
            except Exception:  # a dead stage must not hide the error that ended the request
                stats.stages = []

    def _through(self, seq_id, epoch, pos, x, heads, draft_heads=0):
        """Submits x at pos to every stage in turn; returns (drafts, verified) answers."""
        drafts = None
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            x, tokens = stage.forward(seq_id, epoch, pos, *x, heads=heads if last else draft_heads * (i == 0))
            x = [x]
            if i == 0 and not last:
                drafts = tokens
        return drafts, tokens

    def _prefill(self, seq_id, prompt, stats, t0, get) -> int:
        _, verified = self._through(seq_id, 0, 0, [prompt], heads=1)
        token = get(verified)[-1]
        stats.prefill_s = time.perf_counter() - t0
        return token

    def _pipelined(self, seq_id, prompt, gen, stats, t0, get) -> Iterator[int]:
        token = self._prefill(seq_id, prompt, stats, t0, get)
        yield token
        speculate = gen.mode == Mode.ppsd
        window = self.window if speculate else 1
        last_pos = len(prompt) + gen.max_new_tokens - 2  # the last position whose output we need
        epoch = 0
        in_flight: deque = deque()  # (pos, drafts answer, verified answer)
        next_in, next_pos = [token], len(prompt)
        while True:
            while len(in_flight) < window and next_pos <= last_pos:
                drafts, verified = self._through(seq_id, epoch, next_pos, [next_in], heads=1,
                                                 draft_heads=int(speculate))
                in_flight.append((next_pos, drafts, verified))
                next_in, next_pos = OWN_DRAFT, next_pos + 1
            pos, drafts, verified = in_flight.popleft()
            if not in_flight:
                token = get(verified)[0]
                yield token
                next_in, next_pos = [token], pos + 1
                continue
            # the draft for pos + 1 is already in the pipe behind this token
            verified_tokens, drafted = get([verified, drafts])
            token = verified_tokens[0]
            accepted = drafted[0] == token
            stats.drafted += 1
            stats.accepted += accepted
            stats.trace.append(accepted)
            if not accepted:  # tell the stages before anything else
                stats.rollbacks += 1
                epoch += 1
                for s in self.stages:
                    s.rollback(seq_id, epoch)
                in_flight.clear()
                next_in, next_pos = [token], pos + 1
            yield token

    def _eesd(self, seq_id, prompt, gen, stats, t0, get) -> Iterator[int]:
        token = self._prefill(seq_id, prompt, stats, t0, get)
        yield token
        first, rest = self.stages[0], self.stages[1:]
        pos, remaining = len(prompt), gen.max_new_tokens - 1
        while remaining > 0:
            gamma = min(gen.gamma, remaining - 1)
            # draft: stage 1 alone, each draft feeding the next without a round trip
            hidden, drafts, x = [], [], [token]
            for i in range(gamma):
                h, d = first.forward(seq_id, 0, pos + i, x, heads=1)
                hidden.append(h)
                drafts.append(d)
                x = OWN_DRAFT
            h, _ = first.forward(seq_id, 0, pos + gamma, x, heads=0)
            hidden.append(h)
            # verify: the other stages take all gamma + 1 positions in one pass
            x = hidden
            for stage in rest:
                h, verified = stage.forward(seq_id, 0, pos, *x, heads=gamma + 1)
                x = [h]
            verified = get(verified)
            drafted = [get(d)[0] for d in drafts]
            n = accepted_prefix(drafted, verified)
            stats.drafted += gamma
            stats.accepted += n
            stats.rollbacks += n < gamma
            stats.trace += [True] * n + [False] * (n < gamma)
            for t in verified[: n + 1]:
                yield t
            token, pos, remaining = verified[n], pos + n + 1, remaining - (n + 1)
