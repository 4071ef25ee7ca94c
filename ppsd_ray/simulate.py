"""A discrete-event model of the K-stage pipeline running the Decoder's schedule.

Driven by each stage's decode step time, the latency of one hand-off between
calls (stage to stage, last stage to coordinator, coordinator to stage 1), and
a recorded accept/reject trace. It replays ppsd_ray.schedule.Decoder's
pipelined loop: up to `window` tokens in flight, each stage one call at a time,
and on a rejection the calls that have not started when the rollback reaches a
stage are skipped, while those already running finish (stale work).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence


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


def simulate(timing: Timing, trace: Sequence[bool], tokens: int, window: int) -> SimResult:
    """Time to verify `tokens` tokens after the prefill. trace[i]: whether the draft
    behind verified token i was accepted (read only when a draft was behind it)."""
    k = len(timing.stage_s)
    hop = timing.hop_s
    calls: list[list[tuple[float, float, int]]] = [[] for _ in range(k)]
    free = [0.0] * k
    in_flight: deque = deque()   # (pos, verified_at, draft_at)
    next_ready, next_pos = 0.0, 0
    now, drafts_seen = 0.0, 0
    for verified in range(tokens):
        while len(in_flight) < window and next_pos < tokens:
            ready = next_ready
            for j in range(k):
                start = max(free[j], ready)
                free[j] = start + timing.stage_s[j]
                calls[j].append((start, free[j], next_pos))
                if j == 0:
                    draft_at = free[0] + hop
                ready = free[j] + hop
            in_flight.append((next_pos, ready, draft_at))
            next_ready, next_pos = draft_at, next_pos + 1
        pos, verified_at, _ = in_flight.popleft()
        now = max(now, verified_at)
        if in_flight:
            accepted = trace[drafts_seen] if drafts_seen < len(trace) else True
            drafts_seen += 1
            if accepted:
                continue
            # rollback: calls not yet started when it arrives are skipped
            arrives = now + hop
            stale = {p for p, _, _ in in_flight}
            for j in range(k):
                calls[j] = [c for c in calls[j] if not (c[2] in stale and c[0] >= arrives)]
                free[j] = max([c[1] for c in calls[j]], default=0.0)
            in_flight.clear()
        next_ready, next_pos = now + hop, pos + 1
    return SimResult(decode_s=now, tokens=tokens, calls=calls)


def calibrate_hop(stage_s: Sequence[float], pp_token_s: float) -> float:
    """In pp mode a token costs every stage's step plus K + 1 hand-offs
    (K - 1 between stages, one to the coordinator, one back to stage 1)."""
    return max(0.0, (pp_token_s - sum(stage_s)) / (len(stage_s) + 1))


def decode_step_times(stage_stats: Sequence[dict]) -> list[float]:
    """Each stage's mean decode step from a request's stats (prefill call excluded)."""
    return [(s["compute_s"] - s["prefill_s"]) / max(1, s["calls"] - 1) for s in stage_stats]
