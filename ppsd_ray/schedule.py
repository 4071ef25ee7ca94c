"""The token loop: what enters stage 1, what is committed, what is rolled back.

No Ray here. A Decoder drives a `Pipe`: the pipeline behind one transport
(ppsd_ray.transport: in-process or direct channels; actors.stage: Ray calls).
`submit` sends one call's header (protocol.Work) into stage 1 and answers with
the last stage's Verdict, at once or as a future that `get` resolves. Hidden
states only ever go from stage to stage: the decoder sees headers and verdicts.

Modes (see ../shared/PPSD.md):
- ar / pp: one token in the pipe at a time; the verified token enters next. The
  next call is sent ahead and waits at stage 1: the last stage feeds it the token
  straight (Work.feed), so the coordinator streams tokens without being on their path.
- ppsd: verify-while-draft. Stage 1's exit head drafts the token for p+1 while
  p moves on down the pipe; the draft enters stage 1 on the next step, up to
  `window` tokens in flight; stage 1 feeds its own draft into its next call, so
  drafting never waits on the coordinator. The draft travels down the pipe with
  the hidden state of p, and the last stage verifies it (ppsd_ray.sampling). When
  it is rejected, the verified token is committed, every stage is told to skip the
  stale calls (rollback), and the corrected token enters stage 1 at p+1, which
  drops every stage's KV entries >= p+1.
- eesd: the classic schedule. Stage 1 drafts gamma tokens alone, each feeding the
  next, then the other stages verify all of them in one pass; the accepted prefix
  plus one token from the full model is committed.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

from .config import GenerationConfig, Mode
from .protocol import StageReport, Verdict, Work


class Pipe(Protocol):
    def submit(self, work: Work) -> Any: ...          # a Verdict, or a future of one
    def rollback(self, seq_id: str, epoch: int) -> None: ...
    def release(self, seq_id: str, keep: int, events: bool = False) -> list[Any]: ...  # StageReports


@dataclass(frozen=True)
class TokenLogprobs:
    """A committed token with the full model's log-probability of it and the top alternatives
    (what the stream yields instead of a bare id when GenerationConfig.logprobs is set)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestStats:
    new_tokens: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    rollbacks: int = 0
    repairs: int = 0  # times the pipeline broke under this request and was made whole again
    speculated: bool = False  # ppsd drafted for it (not when it started under load: then it ran as pp)
    wait_s: float = 0.0  # the coordinator blocked on answers; the rest of wall_s is its own work
    trace: list[bool] = field(default_factory=list)  # per verified draft, in order: accepted?
    stages: list[StageReport] = field(default_factory=list)

    @property
    def head_version(self) -> int | None:
        """The exit head version that drafted for the request (stage 1's; None: no exit head)."""
        return self.stages[0].head_version if self.stages else None

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
            "rollbacks": self.rollbacks, "repairs": self.repairs, "speculated": self.speculated,
            "head_version": self.head_version,
            "prefill_s": self.prefill_s, "wait_s": self.wait_s,
            "stage_compute_s": [s.compute_s for s in self.stages],
            "stale_s": sum(s.stale_s for s in self.stages),
            "stages": [s.to_dict() for s in self.stages],
            "trace": "".join("1" if a else "0" for a in self.trace),
        }


class Repair(Protocol):
    """Makes a broken pipeline whole again (a dead stage rebuilt, the transport reconnected).
    `generation` counts rebuilds; a call with an older generation returns at once."""
    generation: int

    def __call__(self, error: Exception, generation: int) -> None: ...  # re-raises error if it cannot


# repairs in a row with no token committed between them: a request whose own input keeps
# killing a stage fails, one that only met several unrelated deaths goes on
MAX_REPAIRS = 3


class Decoder:
    def __init__(self, pipe: Pipe, stages: int, get: Callable[[Any], Any] = lambda x: x,
                 eos_token_ids: Sequence[int] = (), window: int | None = None, repair: Repair | None = None,
                 prefill_chunk: int | None = None, may_draft: Callable[[], bool] = lambda: True,
                 default_mode: Mode | None = None):
        self.pipe = pipe
        self.k = stages
        self.get = get
        self.eos = frozenset(eos_token_ids)
        self.window = window or stages
        self.repair = repair
        self.prefill_chunk = prefill_chunk
        self.may_draft = may_draft  # asked as a ppsd request starts: under load it runs as pp
        self.default_mode = default_mode or (Mode.ppsd if stages > 1 else Mode.ar)  # what mode auto runs

    def decode(self, seq_id: str, prompt: Sequence[int], gen: GenerationConfig,
               stats: RequestStats) -> Iterator[int | TokenLogprobs]:
        """Yields each committed token as soon as it is verified; fills `stats`. If the pipeline
        breaks and `repair` makes it whole, the request goes on from its committed tokens:
        every stage's KV is filled again from the prompt and them, nothing is lost or repeated."""
        k = self.k
        if gen.mode == Mode.auto:
            gen = gen.model_copy(update={"mode": self.default_mode})
        if gen.mode == Mode.ar and k != 1:
            raise ValueError(f"mode: ar runs on a 1-stage pipeline, this one has {k} stages")
        if gen.mode in (Mode.ppsd, Mode.eesd) and k < 2:
            raise ValueError(f"mode: {gen.mode.value} needs at least 2 stages")
        t0 = time.perf_counter()
        done: list[int] = []
        epoch = [0]
        sampling = gen.sampling()

        def get(answer) -> Verdict:
            t = time.perf_counter()
            value = self.get(answer)
            stats.wait_s += time.perf_counter() - t
            return value

        run = self._eesd if gen.mode == Mode.eesd else self._pipelined
        stalled, last_repair_at = 0, 0  # repairs since the last committed token
        try:
            while True:
                generation = self.repair.generation if self.repair else 0
                try:
                    for token in run(seq_id, list(prompt), list(done), gen, sampling, stats, t0, get, epoch):
                        done.append(int(token))
                        stats.new_tokens = len(done)
                        yield token
                        if len(done) >= gen.max_new_tokens or (gen.stop_on_eos and int(token) in self.eos):
                            return
                    return
                except Exception as e:
                    stalled = 1 if len(done) > last_repair_at else stalled + 1
                    last_repair_at = len(done)
                    if self.repair is None or stalled > MAX_REPAIRS:
                        raise
                    self.repair(e, generation)
                    stats.repairs += 1
                    epoch[0] += 1  # whatever was in flight before is stale
        finally:
            stats.wall_s = time.perf_counter() - t0
            # calls still queued are skipped, then the sequence is dropped everywhere. KV is
            # valid for the prompt and every committed token but the newest.
            self.pipe.rollback(seq_id, epoch[0] + 1)
            answers = self.pipe.release(seq_id, len(prompt) + len(done) - 1, gen.timeline)
            try:
                stats.stages = [self.get(a) for a in answers]
            except Exception:  # a dead stage must not hide the error that ended the request
                stats.stages = []

    def _start(self, seq_id, prompt, done, sampling, stats, t0, get, epoch):
        """Fills every stage's KV: the prompt, yielding the first token; or, resuming, the prompt
        and the committed tokens but the newest. Returns (token entering next, its position).

        Resuming replays the calls as they first ran: the prompt in the same chunks, then each
        committed token in a call of its own, all sent at once. A prefill's kernels (many
        queries, other matmul shapes) differ from a decode step's in low bits, so KV refilled in
        one prefill could turn a near-tie later. Exact for ar, pp and ppsd, whose every generated
        position was a one-token call; eesd's verification chunks are not replayed as chunks."""
        if done:
            last = self._prefill(seq_id, epoch[0], prompt, sampling)
            for i, token in enumerate(done[:-1]):
                last = self.pipe.submit(Work(seq_id, epoch[0], len(prompt) + i, (token,), verify=0, sampling=sampling))
            get(last)
            return done[-1], len(prompt) + len(done) - 1
        verdict = get(self._prefill(seq_id, epoch[0], prompt, sampling))
        stats.prefill_s = time.perf_counter() - t0
        yield from _committed(verdict)
        return verdict.tokens[-1], len(prompt)

    def _prefill(self, seq_id, epoch, ids, sampling):
        """Sends the ids in chunks of prefill_chunk, all at once: each stage takes one chunk of a
        sequence per step, so other sequences' tokens go on between them. Only the last chunk
        is verified; the answer to wait for is its Verdict."""
        step = self.prefill_chunk or len(ids)
        for start in range(0, len(ids) - step, step):
            self.pipe.submit(Work(seq_id, epoch, start, tuple(ids[start:start + step]), verify=0, prompt=True,
                                  sampling=sampling))
        start = (len(ids) - 1) // step * step
        return self.pipe.submit(Work(seq_id, epoch, start, tuple(ids[start:]), prompt=True, sampling=sampling))

    def _pipelined(self, seq_id, prompt, done, gen, sampling, stats, t0, get, epoch) -> Iterator:
        token, next_pos = yield from self._start(seq_id, prompt, done, sampling, stats, t0, get, epoch)
        speculate = stats.speculated = gen.mode == Mode.ppsd and self.may_draft()
        window = self.window if speculate else 2  # pp: the call whose token is being verified, and the next
        last_pos = len(prompt) + gen.max_new_tokens - 2  # the last position whose output we need
        in_flight: deque = deque()  # (pos, answer)
        next_in = (token,)

        def fill():
            nonlocal next_in, next_pos
            while len(in_flight) < window and next_pos <= last_pos:
                work = Work(seq_id, epoch[0], next_pos, next_in, draft=speculate,
                            feed=not speculate and next_pos < last_pos, sampling=sampling)
                in_flight.append((next_pos, self.pipe.submit(work)))
                next_in, next_pos = None, next_pos + 1  # None: stage 1's own draft, or the token fed to it

        fill()
        while in_flight:
            pos, answer = in_flight.popleft()
            verdict = get(answer)
            if speculate and in_flight:  # the draft for pos + 1 is already in the pipe behind this token
                accepted = verdict.accepted == 1
                stats.drafted += 1
                stats.accepted += accepted
                stats.trace.append(accepted)
                if not accepted:  # tell the stages before anything else
                    stats.rollbacks += 1
                    epoch[0] += 1
                    self.pipe.rollback(seq_id, epoch[0])
                    in_flight.clear()
            if not in_flight:
                next_in, next_pos = (verdict.tokens[0],), pos + 1
            fill()  # the stages work on while the caller takes the token
            yield from _committed(verdict)

    def _eesd(self, seq_id, prompt, done, gen, sampling, stats, t0, get, epoch) -> Iterator:
        token, pos = yield from self._start(seq_id, prompt, done, sampling, stats, t0, get, epoch)
        remaining = len(prompt) + gen.max_new_tokens - 1 - pos  # tokens still to commit

        def submit():
            # stage 1 drafts gamma tokens alone, each feeding the next; the other stages
            # verify all gamma + 1 positions in one pass
            gamma = min(gen.gamma, remaining - 1)
            work = Work(seq_id, epoch[0], pos, (token,), chain=gamma, verify=gamma + 1, sampling=sampling)
            return gamma, self.pipe.submit(work)

        call = submit() if remaining > 0 else None
        while call:
            gamma, answer = call
            verdict = get(answer)
            n = verdict.accepted
            stats.drafted += gamma
            stats.accepted += n
            stats.rollbacks += n < gamma
            stats.trace += [True] * n + [False] * (n < gamma)
            token, pos, remaining = verdict.tokens[-1], pos + n + 1, remaining - (n + 1)
            call = submit() if remaining > 0 else None  # the stages work on while the caller takes the tokens
            yield from _committed(verdict)


def _committed(verdict: Verdict) -> Iterator[int | TokenLogprobs]:
    if verdict.logprobs is None:
        yield from verdict.tokens
    else:
        for token, (logprob, top) in zip(verdict.tokens, verdict.logprobs):
            yield TokenLogprobs(token, logprob, top)
