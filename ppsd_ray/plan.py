"""Planning: a pipeline config and this machine in, a resolved `Plan` out.

`resolve(config, mode)` is the one place where 'auto' becomes concrete: the exit
layer E, the exit head, the layer split of the K stages, what the stages run on,
and, when anything was 'auto', the predicted stage steps and tokens/s. cli, serve,
bench and the driver (actors/pipeline.py) call it explicitly; PipelineConfig only
validates.

The auto choice (`fastest`) predicts each candidate's time per token from the
costs calibrate.py measures (cached) and its acceptance (theory.ppsd_token_s:
stage 1 = E layers + the draft, the last stage its layers + the LM head, the
middle stages their layers) and takes the fastest. Candidates: every shipped head
for this model (its recorded validation acceptance, with its draft vocabulary if
it has one) and 'lm' at every exit layer (LM_ACCEPTANCE). A head or exit layer
given explicitly narrows the candidates. Not modelled: the hand-off between
stages and each call's fixed cost, which every candidate pays alike.

Stages that batch (max_num_seqs above 1) are predicted from the calibrated cost of a
batched stage step, and with a config's `concurrency` above 1 the choice is by throughput:
tokens/s of that many sequences decoding at once, from the cost of a batched stage step
(calibrate.batched_steps) of as many calls as each stage runs at once: every sequence on
one stage (ar), or the sequences in K batches going round the ring (pp, and ppsd above
draft_max_seqs, where it does not draft; theory.batched_token_s).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from .calibrate import BatchStep, Calibration, calibration, draft_key
from .config import Mode, PipelineConfig, check_exit_layer
from .families import read_config_json
from .heads import HeadMismatch, check_head_meta, read_head_meta, shipped_heads
from .model import model_fingerprint
from .theory import batched_token_s, ppsd_token_s

# The untrained 'lm' head's acceptance when nothing better is known: measured 0.048 - 0.088
# at exits 8 - 15 of SmolLM2-135M-Instruct (docs/heads.md); models not trained for early
# exit are all near there, so it is taken low.
LM_ACCEPTANCE = 0.05
MAX_CPU_STAGES = 4  # mode auto on a CPU considers up to this many stages (one per core at most)


class Plan(BaseModel):
    """A pipeline config resolved on this machine: what the stages hold and run on. The
    predicted figures are there when something was 'auto' (chosen from a calibration)."""
    model_config = ConfigDict(frozen=True)

    mode: Mode                            # what the requests run (mode auto: the plan's choice)
    stages: int                           # K
    exit_layer: int                       # E: stage 1 holds layers [0, E)
    head: str                             # stage 1's exit head: 'lm' or a head file
    layer_ranges: list[tuple[int, int]]   # [start, stop) of each stage
    device: str                           # what the stages run on as seen from here (stage_target):
    threads: int                          # torch threads per CPU stage (1 on GPUs)
    dtype: str
    acceptance: float | None = None       # predicted: the head's acceptance,
    stage_s: list[float] | None = None    # each stage's decode step,
    token_s: float | None = None          # seconds per token
    contention: float | None = None       # CPU stages on one box: the slowdown applied to the steps
    concurrency: int = 1                  # sequences decoding at once the plan is for
    batched_tokens_per_s: float | None = None  # predicted for batched stages (config.batched_stages):
                                               # tokens/s of `concurrency` sequences together
    considered: list[str] = []            # mode auto: every option's predicted tokens/s
    in_process: bool = False              # the one stage runs in the caller's process, without Ray

    @property
    def predicted(self) -> bool:
        return self.token_s is not None

    @property
    def tokens_per_s(self) -> float:
        """Predicted decode tokens/s of the sequences planned for: batched, or one alone."""
        return self.batched_tokens_per_s if self.batched_tokens_per_s is not None else 1 / self.token_s

    def describe(self) -> str:
        """One line for stderr and logs."""
        layers = " | ".join(f"{a}-{b}" for a, b in self.layer_ranges)
        out = (f"{self.mode.value} on {self.stages} stage{'s' if self.stages > 1 else ''} (layers {layers}), "
               f"{self.device}, {self.threads} thread{'s' if self.threads > 1 else ''}, {self.dtype}"
               f"{', in this process' if self.in_process else ''}")
        if self.mode in (Mode.ppsd, Mode.eesd):
            out += f"; exit layer {self.exit_layer}, head {'lm' if self.head == 'lm' else Path(self.head).name}"
            if self.acceptance is not None:
                out += f" (acceptance {self.acceptance:.3f})"
        if self.predicted:
            steps = " / ".join(f"{1e3 * s:.1f}" for s in self.stage_s)
            out += f"; predicted stage steps {steps} ms, {1 / self.token_s:.1f} tokens/s"
        if self.contention:
            out += f" (stages together {self.contention:.2f}x slower than alone)"
        if self.batched_tokens_per_s is not None:
            n = self.concurrency
            out += f"; batched, {n} sequence{'s' if n > 1 else ''} at once: {self.batched_tokens_per_s:.1f} tokens/s"
        if self.considered:
            out += f"; considered (t: threads per stage; tokens/s): {', '.join(self.considered)}"
        return out


def resolve(config: PipelineConfig, mode: Mode | str | None = None) -> Plan:
    """The plan for `config` here. mode 'auto' (or None): the mode and K predicted fastest
    (`choose`); any other mode runs on config.stages stages. 'auto' exit layer and head are
    resolved (calibrating once per model, device, threads and dtype; cached), then checked:
    a ValueError names the field (exit_layer, head) when what 'auto' resolved to does not fit."""
    mode = Mode(mode) if mode is not None else Mode.auto
    if mode == Mode.auto:
        return choose(config)
    return _plan(config, mode, config.stages)


def predict(config: PipelineConfig, mode: Mode | str) -> Plan:
    """`resolve` with the predicted figures always filled in: for the bench, which shows each
    system's prediction beside what it measured."""
    mode = Mode(mode)
    return choose(config) if mode == Mode.auto else _plan(config, mode, config.stages, predict=True)


def choose(config: PipelineConfig) -> Plan:
    """mode auto: of ar on one stage (on a CPU with every thread, half of them or one, unless
    stages or threads are given: more threads are not always faster, measured on a 2-core AMD
    EPYC), and ppsd and pp on each K
    the machine allows (one per GPU; on a CPU up to one stage per core, the threads shared
    out), the plan with the most tokens/s predicted from the calibration. An explicit `stages` is obeyed. On
    one CPU box the stages share its memory bandwidth, so a multi-stage prediction uses a
    layer's step measured while K - 1 peer processes run the same steps (calibrate.contention),
    at most as many as the cores hold beside it.
    With config.concurrency above 1, the plan with the most tokens/s of that many sequences
    together (ties: the first, so ppsd before pp, which it equals where it does not draft).
    Drafts are wanted (ppsd only, on 2 stages or more) when learning them or when a head is given."""
    if config.in_process:
        counts = [1]
    elif "stages" in config.model_fields_set:
        counts = [config.stages]
    else:
        gpus = config.use_gpus if config.use_gpus is not None else torch.cuda.device_count() >= 2
        most = torch.cuda.device_count() if gpus else min(os.cpu_count() or 1, MAX_CPU_STAGES)
        counts = sorted({1, *range(2, min(most, config.info.num_layers) + 1)})
    drafts = config.learn_drafts or config.head != "auto"  # learning needs drafts; a head given is to be used
    if drafts:
        counts = [k for k in counts if k > 1] or counts
    one_stage = [None]  # threads of a one-stage plan: as stage_target gives them (all, given stages 1)
    cores = os.cpu_count() or 1
    if (len(counts) > 1 and config.threads_per_stage is None
            and stage_target(1, config.use_gpus, None, config.dtype)[0] == "cpu"):
        one_stage = sorted({cores, max(1, cores // 2), 1}, reverse=True)
    options = [_plan(config, Mode.ar, 1, predict=True, threads=t) for t in one_stage if 1 in counts]
    options += [_plan(config, m, k, predict=True) for k in counts if k > 1
                for m in ([Mode.ppsd] if drafts else [Mode.ppsd, Mode.pp])]

    best = max(options, key=lambda p: p.tokens_per_s)
    considered = [f"{p.mode.value} K={p.stages} t={p.threads} {p.tokens_per_s:.1f}" for p in options]
    return best.model_copy(update={"considered": considered})


def _plan(config: PipelineConfig, mode: Mode, k: int, predict: bool = False, threads: int | None = None) -> Plan:
    """`mode` on k stages (CPU stages with `threads` each, if given); predicted figures when
    `predict` or when something was 'auto'."""
    if k > 1 and config.in_process:
        raise ValueError(f"in_process: runs one stage; {mode.value} on {k} stages runs in Ray actors")
    device, threads, dtype = stage_target(k, config.use_gpus, threads or config.threads_per_stage, config.dtype)
    layers = config.info.num_layers
    target = dict(mode=mode, stages=k, device=device, threads=threads, dtype=dtype)
    if k == 1:
        plan = Plan(exit_layer=layers, head="lm", layer_ranges=[(0, layers)], in_process=in_process(config, device),
                    **target)
        if not predict:
            return plan
        cal = calibration(config.model_dir, device, threads, dtype, set())
        step = cal.whole_step_s(layers)
        return _batched(config, plan.model_copy(update={"stage_s": [step], "token_s": step}), None)
    drafts = mode in (Mode.ppsd, Mode.eesd)
    if drafts and "auto" in (config.exit_layer, config.head):
        best = fastest(config.model_dir, k, config.given_exit_layer, config.head, device, threads, dtype)
        e, head, key = best.exit_layer, best.head, best.draft_key
        check_exit_layer(e, k, layers)  # a head file given with exit_layer 'auto' brings its own
        if head != "lm":
            try:
                check_head_meta(read_head_meta(head), config.model_dir, e, head)
            except HeadMismatch as err:
                raise ValueError(str(err)) from None
        plan = Plan(exit_layer=e, head=head, layer_ranges=split_layers(layers, k, e), acceptance=best.acceptance,
                    stage_s=best.stage_s, token_s=best.token_s, **target)
    else:
        e = config.exit_layer if isinstance(config.exit_layer, int) else round(layers / k)
        head = "lm" if config.head == "auto" or not drafts else config.head
        plan = Plan(exit_layer=e, head=head, layer_ranges=split_layers(layers, k, e), **target)
        if predict:
            cand = candidates(config.model_dir, layers, k, e, head)[0]
            key = cand.draft_key if drafts else None
            cal = calibration(config.model_dir, device, threads, dtype, {cand.draft_key})
            steps = stage_times(cal, layers, k, e, key)
            token_s = ppsd_token_s(cand.acceptance, steps) if mode == Mode.ppsd else sum(steps)
            plan = plan.model_copy(update={"acceptance": cand.acceptance if drafts else None, "stage_s": steps,
                                           "token_s": token_s})
    if predict and device == "cpu":  # stages on one box slow each other down
        # only as many run at once as the cores hold (K=3 on 2 cores, AMD EPYC: 1.3-1.6x slower in the
        # pipeline than alone, where three processes busy at once measure 2.7x)
        peers = min(k, max(1, (os.cpu_count() or 1) // threads)) - 1
        factor = calibration(config.model_dir, device, threads, dtype, set(), peers=peers).contention.get(peers, 1.0)
        plan = plan.model_copy(update={"stage_s": [s * factor for s in plan.stage_s],
                                       "token_s": plan.token_s * factor, "contention": factor})
    return _batched(config, plan, key) if predict else plan


def in_process(config: PipelineConfig, device: str) -> bool:
    """Whether a one-stage plan runs in the caller's process (config.in_process; None: on this
    CPU, one sequence at a time, no cluster to join). One stage pipelines nothing, and an actor
    only adds Ray: measured on an Intel Xeon (2 threads, SmolLM2-135M, 64 tokens), the stage in
    this process decoded at 1.01x of transformers' generate, 1.005x with an idle Ray cluster up;
    in one bench, the same stage in a Ray actor at 0.94x of it in this process (2026-12-08)."""
    if config.in_process is not None:
        return config.in_process
    return device == "cpu" and config.max_num_seqs == 1 and "RAY_ADDRESS" not in os.environ


def _batched(config: PipelineConfig, plan: Plan, key: str | None) -> Plan:
    """`plan` with its tokens/s at config.concurrency sequences at once on batched stages
    (config.batched_stages; otherwise, planned for one sequence, as it is).
    Each stage runs a batch of its share of the sequences per step (all of them on one stage;
    in ppsd, while it drafts, one call of each sequence), at the cost calibrated for that many
    calls, with the same slowdown of stages on one box as alone. eesd: not predicted."""
    c = config.concurrency
    if not config.batched_stages or plan.mode == Mode.eesd:
        return plan
    cal = calibration(config.model_dir, plan.device, plan.threads, plan.dtype, {key} if key else set(),
                      batched=True)
    drafting = plan.mode == Mode.ppsd and (config.draft_max_seqs is None or c <= config.draft_max_seqs)
    rows = c if drafting else math.ceil(c / min(c, plan.stages))
    step = at_rows(cal.batched, rows)
    steps = [(b - a) * step.layer_s for a, b in plan.layer_ranges]
    steps[-1] += step.lm_head_s
    if drafting:  # an exit head's draft scales with its rows as the LM head does (it ends in it)
        steps[0] += cal.draft_s[key] * step.lm_head_s / cal.lm_head_s
    steps = [s * (plan.contention or 1.0) for s in steps]
    token_s = ppsd_token_s(plan.acceptance, steps) / c if drafting else batched_token_s(steps, c)
    return plan.model_copy(update={"concurrency": c, "batched_tokens_per_s": 1 / token_s})


def at_rows(steps: dict[int, BatchStep], rows: int) -> BatchStep:
    """The calibrated batched step at `rows` calls: linear between the row counts measured,
    and beyond the largest along the line through the two largest."""
    known = sorted(steps)
    hi = next((b for b in known if b >= rows), known[-1])
    lo = max([b for b in known if b < hi] or [hi])
    if lo == hi:
        return steps[hi]
    t = (rows - lo) / (hi - lo)
    return BatchStep(**{f: (1 - t) * getattr(steps[lo], f) + t * getattr(steps[hi], f)
                        for f in BatchStep.model_fields})


def split_layers(num_layers: int, stages: int, exit_layer: int) -> list[tuple[int, int]]:
    """[start, stop) of each stage: stage 1 ends at the exit layer, the rest split evenly."""
    if stages == 1:
        return [(0, num_layers)]
    rest, k = num_layers - exit_layer, stages - 1
    bounds = [exit_layer + (rest * i) // k for i in range(k + 1)]
    return [(0, exit_layer)] + list(zip(bounds[:-1], bounds[1:]))


def stage_target(stages: int, use_gpus: bool | None, threads_per_stage: int | None, dtype: str) -> tuple[str, int, str]:
    """(device, threads, dtype) to calibrate on: what a pipeline's stages will run on, as
    actors/pipeline.py decides them. GPU stages configured from a process without a GPU (a
    Serve app built on a CPU head node) are calibrated on this CPU instead, one thread, in
    their dtype: at batch 1 both are bound by the bytes each step reads, so the relative
    costs that decide the choice carry over roughly (each call's fixed cost, larger on a
    GPU, does not)."""
    gpus = use_gpus if use_gpus is not None else torch.cuda.device_count() >= stages
    if dtype == "auto":
        dtype = "bfloat16" if gpus else "float32"
    if gpus and not torch.cuda.is_available():
        return "cpu", 1, dtype
    if gpus:
        return "cuda", 1, dtype
    return "cpu", threads_per_stage or max(1, (os.cpu_count() or 1) // stages), dtype


# ---- the auto choice -----------------------------------------------------------------------


class Candidate(BaseModel):
    exit_layer: int
    head: str          # 'lm' or a head file
    acceptance: float
    draft_key: str


class Choice(BaseModel):
    """The fastest candidate, with its predicted stage steps and time per token."""
    exit_layer: int
    head: str
    draft_key: str
    acceptance: float
    stage_s: list[float]
    token_s: float
    device: str
    threads: int

    def describe(self) -> str:
        name = "lm" if self.head == "lm" else Path(self.head).name
        steps = " / ".join(f"{1e3 * s:.1f}" for s in self.stage_s)
        return (f"exit layer {self.exit_layer}, head {name} (acceptance {self.acceptance:.3f}); predicted stage "
                f"steps {steps} ms, {1 / self.token_s:.1f} tokens/s ({self.device}, {self.threads} threads)")


def stage_times(cal: Calibration, num_layers: int, stages: int, exit_layer: int, key: str | None) -> list[float]:
    """Each stage's decode step: its layers, stage 1's draft (key None: no draft), the LM head."""
    steps = [(b - a) * cal.layer_s for a, b in split_layers(num_layers, stages, exit_layer)]
    steps[0] += cal.draft_s[key] if key else 0.0
    steps[-1] += cal.lm_head_s
    return steps


def candidates(model_dir: Path, num_layers: int, stages: int, exit_layer: int | None,
               head: str) -> list[Candidate]:
    """'auto' head: the shipped heads for this model and 'lm'; otherwise just that head. A trained head is a candidate at its
    own exit layer only; 'lm' at every valid one. A head file given explicitly is taken as it
    is: `resolve` then checks it, naming the field."""
    valid = range(1, num_layers - stages + 2)
    exits = [exit_layer] if exit_layer is not None else list(valid)
    out = []
    if head in ("auto", "lm"):
        out += [Candidate(exit_layer=e, head="lm", acceptance=LM_ACCEPTANCE, draft_key="lm") for e in exits]
    files = shipped_heads() if head == "auto" else [] if head == "lm" else [Path(head)]
    fp = model_fingerprint(model_dir)
    for path in files:
        try:
            meta = read_head_meta(path)
        except HeadMismatch:
            if head != "auto":
                raise
            continue  # not a head file: never shipped as one
        e = meta.get("exit_layer")
        if head != "auto" or (meta.get("model_fingerprint") == fp and e in valid and e in exits):
            out.append(Candidate(exit_layer=e, head=str(path), acceptance=meta.get("val_greedy_acceptance") or 0.0,
                                 draft_key=draft_key(meta["head_type"], meta.get("draft_vocab_size"))))
    return out


def fastest(model_dir: Path, stages: int, exit_layer: int | None, head: str, device: str, threads: int,
            dtype: str) -> Choice:
    """The candidate with the shortest predicted time per token (ties: the first, lm before trained heads)."""
    model_dir = Path(model_dir)
    num_layers = read_config_json(model_dir)["num_hidden_layers"]
    cands = candidates(model_dir, num_layers, stages, exit_layer, head)
    cal = calibration(model_dir, device, threads, dtype, {c.draft_key for c in cands})
    best = None
    for c in cands:
        steps = stage_times(cal, num_layers, stages, c.exit_layer, c.draft_key)
        token_s = ppsd_token_s(c.acceptance, steps)
        if best is None or token_s < best.token_s:
            best = Choice(exit_layer=c.exit_layer, head=c.head, draft_key=c.draft_key, acceptance=c.acceptance,
                          stage_s=steps, token_s=token_s, device=device, threads=threads)
    return best
