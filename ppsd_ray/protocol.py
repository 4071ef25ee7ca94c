"""The messages of the pipeline, the same on every transport.

The coordinator sends a `Work` to stage 1: the header of one call, which every
stage sees. Each stage hands the next a `Hop`: the header, the hidden state of
the call's positions and stage 1's drafts travelling with it. The last stage
verifies those drafts and answers the coordinator with a `Verdict`; in pp it
also feeds that Verdict to stage 1, whose next call takes its token. When a
sequence ends, each stage answers `release` with its `StageReport`.

A `Work` names one sequence; a stage step runs the calls of several sequences in
one forward, and the direct transport carries a step's hops and verdicts as lists.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class Sampling:
    """How a token is chosen (ppsd_ray.sampling): temperature 0 is greedy."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    logprobs: Optional[int] = None  # top alternatives to report per token; None: no logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


@dataclass(frozen=True)
class Work:
    """One call: `tokens` enter stage 1 at `pos`, then stage 1 runs `chain` more positions,
    each on the draft it just made (eesd), and drafts once more after the last one if
    `draft` (ppsd: that draft enters on the next call). The last stage verifies the call's
    last `verify` positions (0: a prompt chunk before the last, answered with no tokens). A call with `feed` (pp) has the last stage hand its Verdict
    straight to stage 1 as well: the next call's token comes round from there, not through
    the coordinator. tokens None: the token made for `pos` by the call before, stage 1's
    own draft (ppsd) or the one fed to it (pp)."""
    seq_id: str
    epoch: int
    pos: int
    tokens: Optional[tuple[int, ...]]
    chain: int = 0
    draft: bool = False
    verify: int = 1
    feed: bool = False
    prompt: bool = False  # a chunk of the prompt: text the model did not write (never learned from)
    sampling: Sampling = GREEDY  # last: the direct transport's wire format relies on it


@dataclass
class Hop:
    """What a stage hands the next: the hidden state of the call's positions [1, n, H] and
    stage 1's drafts, each with the distribution it was drawn from (None when greedy)."""
    work: Work
    hidden: torch.Tensor
    drafts: list[int]
    draft_dists: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None  # (token ids, probs) per draft


@dataclass
class Verdict:
    """The last stage's answer: the tokens this call commits (the accepted drafts, then
    the correction or the next token), and how many drafts were accepted."""
    seq_id: str
    epoch: int
    pos: int
    tokens: list[int]
    drafted: int
    accepted: int
    logprobs: Optional[list] = None  # per committed token: (logprob, ((id, logprob), ...))


@dataclass
class StageReport:
    """One stage's work on one sequence: seconds computing (the first call, the prefill,
    also alone), seconds on positions later rolled back (of those, seconds in calls stopped
    between layers), calls computed and skipped as stale, and with a timeline each computed
    call's (start, end, pos, n)."""
    index: int = 0
    compute_s: float = 0.0
    prefill_s: float = 0.0
    stale_s: float = 0.0
    stopped_s: float = 0.0
    calls: int = 0
    skipped: int = 0
    head_version: Optional[int] = None  # stage 1: the exit head version that drafted for the sequence
    events: list[tuple[float, float, int, int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Samples:
    """What stage 1 hands an online learner: per committed sequence, the exit layer's hidden
    states [n, H] (fp16) and each position's target [n], the token the model wrote next (-1
    where it did not: the prompt's positions but the last); and the exit head version stage 1
    now drafts new sequences with."""
    hidden: list[torch.Tensor]
    targets: list[torch.Tensor]
    head_version: int
