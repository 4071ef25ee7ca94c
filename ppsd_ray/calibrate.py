"""Balanced stages: measure what a stage step costs here, then pick the exit layer and head.

`calibration` times, on the device, dtype and thread count the stages will use,
one decode step (a single new token over a KV cache of CONTEXT positions) of one
decoder layer, of the full LM head (final norm, LM head, argmax), and of each
exit head kind's draft (with its draft vocabulary size). About 5 s on the real
model (building the timed modules included), well under a second on the tiny
test model. The result is cached as JSON
under cache_dir()/calibration/, one file per (model fingerprint, device, threads,
dtype); a later call measures only what the file lacks.

`plan` predicts each candidate's time per token from those costs and its
acceptance (theory.ppsd_token_s: stage 1 = E layers + the draft, the last stage
its layers + the LM head, the middle stages their layers) and takes the fastest.
Candidates: every shipped head for this model (its recorded validation
acceptance, with its draft vocabulary if it has one) and 'lm' at every exit layer
(LM_ACCEPTANCE). A head or exit layer given explicitly narrows the candidates.
Not modelled: the hand-off between stages and each call's fixed cost, which
every candidate pays alike.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from pydantic import BaseModel

from .config import split_layers
from .model import cache_dir, model_fingerprint
from .theory import ppsd_token_s

# The untrained 'lm' head's acceptance when nothing better is known: measured 0.048 - 0.088
# at exits 8 - 15 of SmolLM2-135M-Instruct (docs/heads.md); models not trained for early
# exit are all near there, so it is taken low.
LM_ACCEPTANCE = 0.05
CONTEXT = 64          # cached positions a timed decode step attends over
STACK = 4             # layers timed together (SmolLM2-135M: 4 x 14 MB, more than this CPU's 32 MB L3)
BUDGET_S = 0.5        # per timed item: repeat for about this long, MIN_RUNS to MAX_RUNS times
MIN_RUNS, MAX_RUNS = 5, 30


class Calibration(BaseModel):
    """Seconds of one single-token decode step on one device at one thread count."""
    model_fingerprint: str
    device: str
    threads: int
    dtype: str
    layer_s: float                  # one decoder layer
    lm_head_s: float                # final norm + full LM head + argmax
    draft_s: dict[str, float] = {}  # an exit head's draft, by draft_key(kind, vocabulary size)


class Candidate(BaseModel):
    exit_layer: int
    head: str          # 'lm' or a head file
    acceptance: float
    draft_key: str


class Plan(BaseModel):
    """The chosen exit layer and head, with the predicted stage steps and time per token."""
    exit_layer: int
    head: str
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


def draft_key(kind: str, vocab_size: int | None) -> str:
    return kind if vocab_size is None else f"{kind}@{vocab_size}"


def stage_times(cal: Calibration, num_layers: int, stages: int, exit_layer: int, key: str) -> list[float]:
    steps = [(b - a) * cal.layer_s for a, b in split_layers(num_layers, stages, exit_layer)]
    steps[0] += cal.draft_s[key]
    steps[-1] += cal.lm_head_s
    return steps


def candidates(model_dir: Path, num_layers: int, stages: int, exit_layer: int | None,
               head: str) -> list[Candidate]:
    """'auto' head: the shipped heads for this model and 'lm'; otherwise just that head. A
    trained head is a candidate at its own exit layer only; 'lm' at every valid one. A head
    file given explicitly is taken as it is: PipelineConfig then checks it, naming the field."""
    from .heads import HeadMismatch, read_head_meta, shipped_heads

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


def plan(model_dir: Path, stages: int, exit_layer: int | None, head: str, device: str, threads: int,
         dtype: str) -> Plan:
    """The candidate with the shortest predicted time per token (ties: the first, lm before trained heads)."""
    model_dir = Path(model_dir)
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    cands = candidates(model_dir, num_layers, stages, exit_layer, head)
    cal = calibration(model_dir, device, threads, dtype, {c.draft_key for c in cands})
    best = None
    for c in cands:
        steps = stage_times(cal, num_layers, stages, c.exit_layer, c.draft_key)
        token_s = ppsd_token_s(c.acceptance, steps)
        if best is None or token_s < best.token_s:
            best = Plan(exit_layer=c.exit_layer, head=c.head, acceptance=c.acceptance, stage_s=steps,
                        token_s=token_s, device=device, threads=threads)
    return best


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


# ---- measurement ---------------------------------------------------------------------------

_MEMO: dict[Path, Calibration] = {}


def cache_file(fingerprint: str, device: str, threads: int, dtype: str) -> Path:
    return cache_dir() / "calibration" / f"{fingerprint}-{device}-{threads}t-{dtype}.json"


def calibration(model_dir: Path, device: str, threads: int, dtype: str, draft_keys: set[str],
                remeasure: bool = False, runs: int | None = None) -> Calibration:
    """The cached calibration, measuring first whatever it lacks of `draft_keys` (everything,
    with `remeasure`)."""
    path = cache_file(model_fingerprint(model_dir), device, threads, dtype)
    cal = None if remeasure else _MEMO.get(path)
    if cal is None and path.is_file() and not remeasure:
        cal = Calibration.model_validate_json(path.read_text())
    if cal is None or not draft_keys <= cal.draft_s.keys():
        cal = measure(Path(model_dir), device, threads, dtype, draft_keys, cal, runs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.partial")
        tmp.write_text(cal.model_dump_json(indent=1))
        tmp.replace(path)
    _MEMO[path] = cal
    return cal


@torch.inference_mode()
def measure(model_dir: Path, device: str, threads: int, dtype: str, draft_keys: set[str],
            known: Calibration | None = None, runs: int | None = None) -> Calibration:
    """Times what `known` lacks (each item the median of `runs` runs; default: about
    BUDGET_S of runs). Weights other than the LM head's are random: the same cost.

    Layers are timed as a chain of STACK one-layer models (each call's mask and rotary
    set-up included), whose weights together outgrow the CPU caches, as a stage's do;
    heads are timed each right after such a chain (untimed), so that they start cold too."""
    from .distill import frozen_parts
    from .heads import build_head

    with _threads(threads):
        norm, lm_head, config = frozen_parts(model_dir)
        norm, lm_head = norm.to(device, getattr(torch, dtype)), lm_head.to(device, getattr(torch, dtype))
        x = torch.randn(1, 1, config.hidden_size, device=device, dtype=lm_head.weight.dtype)
        pos = torch.tensor([[CONTEXT]], device=device)

        def head_at_context(kind: str, vocab_size: int | None = None):
            head = build_head(kind, 1, norm, lm_head, config).to(device, lm_head.weight.dtype).eval()
            if vocab_size is not None:
                head.set_draft_vocab(torch.arange(vocab_size))
            cache = head.new_cache()
            if cache is not None:  # CONTEXT positions cached; every timed call adds the next one
                prefix = torch.randn(1, CONTEXT, config.hidden_size, device=device, dtype=x.dtype)
                head.features(prefix, torch.arange(CONTEXT, device=device)[None], cache)
            return head, cache

        def at_context(cache):
            if cache is not None and cache.get_seq_length() > CONTEXT:
                cache.crop(CONTEXT)

        stack = [head_at_context("layer") for _ in range(min(STACK, config.num_hidden_layers))]

        def layers():
            h = x
            for head, cache in stack:
                at_context(cache)
                h = head.features(h, pos, cache)
            return h

        if known is None:
            known = Calibration(model_fingerprint=model_fingerprint(model_dir), device=device, threads=threads,
                                dtype=dtype, layer_s=_median_s(layers, device, runs) / len(stack),
                                lm_head_s=_median_s(lambda: lm_head(norm(x)).argmax(-1), device, runs, layers))
        draft_s = dict(known.draft_s)
        for key in sorted(draft_keys - draft_s.keys()):
            kind, _, size = key.partition("@")
            head, cache = head_at_context(kind, int(size) if size else None)

            def draft(head=head, cache=cache):
                at_context(cache)
                return head.draft(x, pos, cache)
            draft_s[key] = _median_s(draft, device, runs, layers)
    return known.model_copy(update={"draft_s": draft_s})


def _median_s(fn, device: str, runs: int | None = None, before=None) -> float:
    """Median seconds of fn(); `before()` runs untimed ahead of each call."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def more(times, start) -> bool:
        if runs:
            return len(times) < runs
        return len(times) < MIN_RUNS or (len(times) < MAX_RUNS and time.perf_counter() - start < BUDGET_S)

    fn()  # warm-up
    sync()
    times, start = [], time.perf_counter()
    while more(times, start):
        if before is not None:
            before()
            sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
