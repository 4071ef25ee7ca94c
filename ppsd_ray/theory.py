"""Ideal speedups over plain autoregressive decoding (../shared/PPSD.md).

alpha: probability that a draft equals the verified token.
"""
from __future__ import annotations


def ppsd_speedup(alpha: float, stages: int) -> float:
    """K balanced stages, no overhead: an accepted token costs one stage step,
    a rejected one K steps (the correction crosses the whole pipe)."""
    return stages / (alpha + (1 - alpha) * stages)


def eesd_speedup(alpha: float, gamma: int, exit_fraction: float) -> float:
    """Classic early-exit self-speculation: gamma drafts at cost e each, then one
    full verification pass; expected tokens per round (1 - alpha^(gamma+1)) / (1 - alpha)."""
    tokens = gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * exit_fraction + 1)


def efficiency(measured_speedup: float, alpha: float, stages: int) -> float:
    """Measured speedup over the ideal PPSD speedup at the measured acceptance."""
    return measured_speedup / ppsd_speedup(alpha, stages)
