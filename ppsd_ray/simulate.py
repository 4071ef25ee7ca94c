"""A discrete-event model of the K-stage pipeline, driving the real token loop.

ppsd_ray.schedule.Decoder runs unchanged against a `TimedPipe`: fake stages in
virtual time, given each stage's decode step time, the latency of one hand-off
between calls (stage to stage, last stage to coordinator, coordinator to stage 1,
last stage to stage 1 in pp, and one stage-1 call to its next), and a recorded
accept/reject trace. Each stage
runs one call at a time; on a rollback, the calls that have not started when it
reaches a stage are skipped, while those already running finish (stale work).
The prefill costs nothing here: times are decode times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .config import GenerationConfig
from .protocol import StageReport, Verdict, Work
from .schedule import Decoder, RequestStats


@dataclass
class Timing:
    stage_s: list[float]  # one single-token decode step of each stage
    hop_s: float          # one hand-off between calls


@dataclass
class SimResult:
    decode_s: float
    tokens: int
    calls: list[list[tuple[float, float, int]]] = field(default_factory=list)  # per stage: (start, end, pos)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s else 0.0


@dataclass
class _Answer:
    work: Work
    ready: float  # when the verdict reaches the coordinator


class TimedPipe:
    """The Pipe protocol in virtual time. `now` advances when the Decoder gets an answer;
    the verdict of a call with a draft behind it follows the trace, in order."""

    def __init__(self, timing: Timing, trace: Sequence[bool]):
        self.timing, self.trace = timing, list(trace)
        k = len(timing.stage_s)
        self.calls: list[list[tuple[float, float, int]]] = [[] for _ in range(k)]
        self.free = [0.0] * k
        self.now = 0.0
        self._stage1_done = 0.0  # when stage 1's newest call ends: its own draft is ready then
        self._last_done = 0.0  # when the last stage's newest call ends: pp feeds its token to stage 1
        self._verified = 0

    def submit(self, work: Work) -> _Answer:
        hop = self.timing.hop_s
        if work.pos == 0:  # the prefill: free, answered at once
            return _Answer(work, 0.0)
        if work.tokens is not None:
            ready = self.now + hop
        else:  # stage 1's own draft (ppsd), or the token the last stage fed it (pp)
            ready = (self._stage1_done if work.draft else self._last_done) + hop
        for j, step in enumerate(self.timing.stage_s):
            start = max(self.free[j], ready)
            self.free[j] = start + step
            self.calls[j].append((start, self.free[j], work.pos))
            if j == 0:
                self._stage1_done = self.free[0]
            ready = self.free[j] + hop
        self._last_done = self.free[-1]
        return _Answer(work, ready)

    def get(self, answer: _Answer) -> Verdict:
        self.now = max(self.now, answer.ready)
        work = answer.work
        if not work.draft:
            return Verdict(work.seq_id, work.epoch, work.pos, [0], 0, 0)
        accepted = self.trace[self._verified] if self._verified < len(self.trace) else True
        self._verified += 1
        return Verdict(work.seq_id, work.epoch, work.pos, [0], 1, int(accepted))

    def rollback(self, seq_id: str, epoch: int) -> None:
        arrives = self.now + self.timing.hop_s
        for j, calls in enumerate(self.calls):  # each stage's calls are in order of start and of end
            while calls and calls[-1][0] >= arrives and calls[-1][2] != 0:
                calls.pop()
            self.free[j] = calls[-1][1] if calls else 0.0
        self._stage1_done = self.free[0]

    def release(self, seq_id: str, keep: int, events: bool = False) -> list[StageReport]:
        return [StageReport(j) for j in range(len(self.calls))]


def simulate(timing: Timing, trace: Sequence[bool], tokens: int, window: int) -> SimResult:
    """Time to verify `tokens` tokens after the prefill, by the Decoder's own schedule: ppsd
    with `window` tokens in flight, or pp for window 1. trace[i]: whether the draft behind
    verified token i was accepted."""
    pipe = TimedPipe(timing, trace)
    k = len(timing.stage_s)
    mode = "ppsd" if window > 1 and k > 1 else ("pp" if k > 1 else "ar")
    decoder = Decoder(pipe, k, get=pipe.get, window=window)
    gen = GenerationConfig(mode=mode, max_new_tokens=tokens + 1, stop_on_eos=False)
    for _ in decoder.decode("sim", [0], gen, RequestStats()):
        pass
    return SimResult(decode_s=pipe.now, tokens=tokens, calls=pipe.calls)


def calibrate_hop(stage_s: Sequence[float], pp_token_s: float) -> float:
    """In pp mode a token costs every stage's step plus K hand-offs (K - 1 between
    stages, one from the last stage back to stage 1: the coordinator is off that path)."""
    return max(0.0, (pp_token_s - sum(stage_s)) / len(stage_s))


def decode_step_times(stage_stats: Sequence[dict]) -> list[float]:
    """Each stage's mean decode call from a request's stats (prefill excluded, and calls
    stopped between layers: their time is in compute_s but they are not in calls)."""
    return [(s["compute_s"] - s["prefill_s"] - s["stopped_s"]) / max(1, s["calls"] - 1)
            for s in stage_stats]
