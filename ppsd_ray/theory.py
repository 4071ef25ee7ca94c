"""Ideal speedups over plain autoregressive decoding (../shared/PPSD.md).

alpha: probability that a draft equals the verified token.
"""
from __future__ import annotations

import math
from typing import Sequence


def ppsd_speedup(alpha: float, stages: int) -> float:
    """K balanced stages, no overhead: an accepted token costs one stage step,
    a rejected one K steps (the correction crosses the whole pipe)."""
    return stages / (alpha + (1 - alpha) * stages)


def ppsd_token_s(alpha: float, stage_s: Sequence[float], hop_s: float = 0.0) -> float:
    """Expected seconds per token on K stages of unequal step times, window K (the schedule
    of ppsd_ray/simulate.py). An accepted token costs the bottleneck: the slowest stage, or
    the pipe's latency over K when the window limits. A rejected one costs the latency (the
    corrected token crosses every stage, K + 1 hand-offs), or longer when stage 1 is still
    busy drafting then: it drafts back to back, up to K - 1 ahead, and a started call
    finishes. Balanced, no hops: 1 / ppsd_speedup of a forward pass."""
    k = len(stage_s)
    latency = sum(stage_s) + (k + 1) * hop_s
    accepted = max(max(stage_s) + hop_s, latency / k)
    first = stage_s[0] + hop_s  # stage 1's period while it drafts
    rejected = max(latency, first * min(k, math.ceil(latency / first - 1e-9)))
    return alpha * accepted + (1 - alpha) * rejected


def eesd_speedup(alpha: float, gamma: int, exit_fraction: float) -> float:
    """Classic early-exit self-speculation: gamma drafts at cost e each, then one
    full verification pass; expected tokens per round (1 - alpha^(gamma+1)) / (1 - alpha)."""
    tokens = gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * exit_fraction + 1)


def efficiency(measured_speedup: float, alpha: float, stages: int) -> float:
    """Measured speedup over the ideal PPSD speedup at the measured acceptance."""
    return measured_speedup / ppsd_speedup(alpha, stages)


def batched_token_s(stage_s: Sequence[float], sequences: int) -> float:
    """Seconds per token of `sequences` decoded together without drafts (ar, pp) on K stages,
    each step `stage_s` running one batch of ceil(sequences / min(sequences, K)) calls: the
    sequences go round the ring in min(sequences, K) batches, and a batch's round trip is
    the pipe's latency, or longer when the slowest stage has more than one batch to run per
    round. One stage: a step per token of every sequence."""
    groups = min(sequences, len(stage_s))
    return max(sum(stage_s), groups * max(stage_s)) / sequences
