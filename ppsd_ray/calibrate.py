"""Calibration: measure what a stage step costs here (ppsd_ray/plan.py then picks the exit layer and head).

`calibration` times, on the device, dtype and thread count the stages will use,
one decode step (a single new token over a KV cache of CONTEXT positions) of one
decoder layer and of the LM head with verification, each through a real Stage
(ppsd_ray.stage), and of each exit head kind's draft (with its draft vocabulary size). 10-40 s per thread count
on the real model (building the timed modules and, on a CPU, the stages-together
slowdown included), a second or two on the tiny test model. The result is cached as JSON
under cache_dir()/calibration/, one file per (model fingerprint, device, threads,
dtype); a later call measures only what the file lacks.

For planning under load (plan.py, a config's `concurrency`), `batched` times the same
Stage's step with the kernels of stages planned for load (batch-invariant tiles) over
b decode calls of b sequences at once, for each b in ROWS, and the LM head over b rows.

`BoxProbe` times the whole-model step again during a benchmark, as the calibration timed it: the
box's speed of the moment, which each prediction is read against.
"""
from __future__ import annotations

import os
import subprocess
import sys
import statistics
import time
from pathlib import Path
from typing import Iterable

import torch
from pydantic import BaseModel

from .distill import frozen_parts
from .heads import build_head
from .kv import torch_threads
from .model import cache_dir, model_fingerprint
from .protocol import Hop, Work
from .stage import Stage

CONTEXT = 64          # cached positions a timed decode step attends over
VERSION = 5           # in the cache file's name: 2 timed every layer, 3 stages with weights stored transposed (kv.batch_layout), 4 the layer and LM head through real stages, 5 oneDNN packed linears (kv.PackedLinear)
BUDGET_S = 0.5        # per timed item: repeat for about this long, MIN_RUNS to MAX_RUNS times
MIN_RUNS, MAX_RUNS = 5, 30
ROWS = (1, 2, 4, 8, 16, 32)  # decode calls per stage step timed for planning under load


class Calibration(BaseModel):
    """Seconds of one single-token decode step on one device at one thread count."""
    model_fingerprint: str
    device: str
    threads: int
    dtype: str
    layer_s: float                  # one decoder layer
    lm_head_s: float                # final norm + full LM head + argmax
    draft_s: dict[str, float] = {}  # an exit head's draft, by draft_key(kind, vocabulary size)
    # layer_s with this many other processes doing the same work at once (stages sharing one box:
    # memory bandwidth, caches), divided by layer_s alone; by number of peers
    contention: dict[int, float] = {}
    batched: dict[int, "BatchStep"] = {}  # a stage step of b decode calls at once, by b

    def whole_step_s(self, num_layers: int) -> float:
        """One decode step of the whole model on one stage: every layer and the LM head."""
        return BatchStep(layer_s=self.layer_s, lm_head_s=self.lm_head_s).whole_step_s(num_layers)


class BatchStep(BaseModel):
    """Seconds of a batched stage step of b decode calls (b sequences, one token each)."""
    layer_s: float    # one decoder layer
    lm_head_s: float  # the LM head (final norm included) and verification of b rows

    def whole_step_s(self, num_layers: int) -> float:
        return num_layers * self.layer_s + self.lm_head_s


Calibration.model_rebuild()


def draft_key(kind: str, vocab_size: int | None) -> str:
    return kind if vocab_size is None else f"{kind}@{vocab_size}"


# ---- measurement ---------------------------------------------------------------------------

_MEMO: dict[Path, Calibration] = {}


def cache_file(fingerprint: str, device: str, threads: int, dtype: str) -> Path:
    return cache_dir() / "calibration" / f"{fingerprint}-{device}-{threads}t-{dtype}-v{VERSION}.json"


def forget(model_dir: Path) -> None:
    """Drops this model's cached calibrations (every device and thread count): the next plan
    measures afresh. A CPU's speed drifts within hours (README, "Planning")."""
    fingerprint = model_fingerprint(model_dir)
    for path in (cache_dir() / "calibration").glob(f"{fingerprint}-*.json"):
        _MEMO.pop(path, None)
        path.unlink(missing_ok=True)


def calibration(model_dir: Path, device: str, threads: int, dtype: str, draft_keys: set[str],
                remeasure: bool = False, runs: int | None = None, peers: int = 0,
                batched: bool = False) -> Calibration:
    """The cached calibration, measuring first whatever it lacks of `draft_keys` (everything,
    with `remeasure`), on a CPU the slowdown with `peers` other stages busy beside it, and
    with `batched` the stage steps of ROWS calls at once."""
    path = cache_file(model_fingerprint(model_dir), device, threads, dtype)
    cal = None if remeasure else _MEMO.get(path)
    if cal is None and path.is_file() and not remeasure:
        cal = Calibration.model_validate_json(path.read_text())
    peers = peers if device == "cpu" else 0  # GPU stages each own their device
    lacks_batched = batched and (cal is None or not set(ROWS) <= cal.batched.keys())
    if (cal is None or not draft_keys <= cal.draft_s.keys() or (peers and peers not in cal.contention)
            or lacks_batched):
        cal = measure(Path(model_dir), device, threads, dtype, draft_keys, cal, runs)
        if peers and peers not in cal.contention:
            cal = cal.model_copy(update={"contention": cal.contention | {peers: contention(model_dir, threads, dtype,
                                                                                         peers)}})
        if lacks_batched:
            cal = cal.model_copy(update={"batched": batched_steps(Path(model_dir), device, threads, dtype, runs)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.partial")
        tmp.write_text(cal.model_dump_json(indent=1))
        tmp.replace(path)
    _MEMO[path] = cal
    return cal


def contention(model_dir: Path, threads: int, dtype: str, peers: int) -> float:
    """A layer step's time in one of peers + 1 stages sharing this CPU, over its time in the
    whole model alone: what stages on one box cost each other (shared memory bandwidth and
    caches, the OS's scheduling), which a calibration alone does not see. Each process runs
    its share of the layers, as the stages do. The peers are plain subprocesses
    (`python -m ppsd_ray.calibrate busy ...`), never a re-run of the caller's script."""
    num_layers = frozen_parts(model_dir)[2].num_hidden_layers
    share = -(-num_layers // (peers + 1))
    cmd = [sys.executable, "-m", "ppsd_ray.calibrate", "busy", str(model_dir), str(threads), dtype, str(share)]
    with torch_threads(threads), torch.inference_mode():
        alone = _median_s(_layer_stack(Path(model_dir), "cpu", dtype), "cpu", MAX_RUNS) / num_layers
        layers = _layer_stack(Path(model_dir), "cpu", dtype, share)
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) for _ in range(peers)]
        try:
            for p in procs:
                if p.stdout.readline().strip() != b"ready":
                    raise RuntimeError(f"calibration peer exited with {p.wait()}")
            together = _median_s(layers, "cpu", MAX_RUNS) / share
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return max(1.0, together / alone)


def _busy(model_dir: str, threads: int, dtype: str, num_layers: int) -> None:
    """A peer stage: decode steps of `num_layers` layers until killed."""
    with torch_threads(threads), torch.inference_mode():
        layers = _layer_stack(Path(model_dir), "cpu", dtype, num_layers)
        layers()
        print("ready", flush=True)
        while True:
            layers()


def _layer_stack(model_dir: Path, device: str, dtype: str, num_layers: int | None = None):
    """A decode step through `num_layers` (default: as many as the model has) one-layer
    models over CONTEXT cached positions."""
    norm, lm_head, config = frozen_parts(model_dir)
    lm_head = lm_head.to(device, getattr(torch, dtype))
    x = torch.randn(1, 1, config.hidden_size, device=device, dtype=lm_head.weight.dtype)
    pos = torch.tensor([[CONTEXT]], device=device)
    stack = []
    for _ in range(num_layers or config.num_hidden_layers):
        head = build_head("layer", 1, norm, lm_head, config).to(device, lm_head.weight.dtype).eval()
        cache = head.new_cache()
        head.features(torch.randn(1, CONTEXT, config.hidden_size, device=device, dtype=x.dtype),
                      torch.arange(CONTEXT, device=device)[None], cache)
        stack.append((head, cache))

    def layers():
        h = x
        for head, cache in stack:
            if cache.get_seq_length() > CONTEXT:
                cache.crop(CONTEXT)
            h = head.features(h, pos, cache)
        return h
    return layers


@torch.inference_mode()
def measure(model_dir: Path, device: str, threads: int, dtype: str, draft_keys: set[str],
            known: Calibration | None = None, runs: int | None = None) -> Calibration:
    """Times what `known` lacks (each item the median of `runs` runs; default: about
    BUDGET_S of runs).

    The layer and the LM head are timed through real stages, as a pipeline planned for one
    sequence runs them (`stage_steps`, one decode call, each row with the 1-row kernel): a
    proxy of one-layer models (a mask and rotary set-up per layer) timed 10-35% slower than
    the stage on an Intel Xeon, by amounts that moved from run to run. Every layer of
    the model is in the step: decoding reads every layer's weights once per token, so
    whether they stay in the CPU's caches is as in decoding (an Intel Xeon with a 480 MB L3
    held 4 layers of SmolLM2-135M there, 30% faster, but not the model). Exit heads' drafts
    are timed each right after a chain of every layer (untimed, random weights), so that
    they start cold too."""
    with torch_threads(threads):
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

        if known is None:
            step = stage_steps(model_dir, device, threads, dtype, (1,), batched=False, runs=runs)[1]
            known = Calibration(model_fingerprint=model_fingerprint(model_dir), device=device, threads=threads,
                                dtype=dtype, layer_s=step.layer_s, lm_head_s=step.lm_head_s)
        draft_s = dict(known.draft_s)
        layers = _layer_stack(model_dir, device, dtype) if draft_keys - draft_s.keys() else None
        for key in sorted(draft_keys - draft_s.keys()):
            kind, _, size = key.partition("@")
            head, cache = head_at_context(kind, int(size) if size else None)

            def draft(head=head, cache=cache):
                at_context(cache)
                return head.draft(x, pos, cache)
            draft_s[key] = _median_s(draft, device, runs, layers)
    return known.model_copy(update={"draft_s": draft_s})


def batched_steps(model_dir: Path, device: str, threads: int, dtype: str, runs: int | None = None) -> dict[int, BatchStep]:
    """Stage steps of b decode calls at once for each b in ROWS, on stages planned for load."""
    return stage_steps(model_dir, device, threads, dtype, ROWS, batched=True, runs=runs)


def stage_steps(model_dir: Path, device: str, threads: int, dtype: str, rows: tuple[int, ...], batched: bool,
                runs: int | None = None) -> dict[int, BatchStep]:
    """For each b in rows, the step of b decode calls at once (StageTimer)."""
    return StageTimer(model_dir, device, threads, dtype, max(rows), batched).steps(rows, runs)


class StageTimer:
    """Times stage steps of b decode calls (b sequences at CONTEXT cached positions) through a real
    middle Stage of all the layers, per layer; and the last stage's LM head and verification over
    b rows: its step through one layer less the layer, timed right after a middle step, so that it
    starts as cold as in decoding. `batched`: the stages' kernels (Stage's, tiles for batches or each
    row alone). The stages are built once, so a run can time the same step again and again."""

    @torch.inference_mode()
    def __init__(self, model_dir: Path, device: str, threads: int, dtype: str, max_rows: int, batched: bool):
        self.device, self.threads = device, threads
        self.num_layers = num_layers = frozen_parts(model_dir)[2].num_hidden_layers
        with torch_threads(threads):
            self.middle = Stage(model_dir, 0, num_layers, index=1, num_stages=3, dtype=dtype, device=device,
                                batched=batched)
            self.last = Stage(model_dir, num_layers - 1, num_layers, index=1, num_stages=2, dtype=dtype,
                              device=device, batched=batched)
            hidden, torch_dtype = self.middle.config.hidden_size, getattr(torch, dtype)
            for stage in (self.middle, self.last):
                for i in range(max_rows):
                    work = Work(f"s{i}", 0, 0, None, verify=0, prompt=True)
                    prompt = torch.randn(1, CONTEXT, hidden, device=device, dtype=torch_dtype)
                    stage.forward_batch([(work, Hop(work, prompt, []))])
        self._hidden, self._dtype = hidden, torch_dtype

    @torch.inference_mode()
    def steps(self, rows: tuple[int, ...], runs: int | None = None) -> dict[int, BatchStep]:
        out = {}
        with torch_threads(self.threads):
            for b in rows:
                calls = []
                for i in range(b):
                    work = Work(f"s{i}", 0, CONTEXT, None)  # each step first drops what the one before cached
                    calls.append((work, Hop(work, torch.randn(1, 1, self._hidden, device=self.device,
                                                              dtype=self._dtype), [])))
                layer_s = _median_s(lambda: self.middle.forward_batch(calls), self.device, runs) / self.num_layers
                last_s = _median_s(lambda: self.last.forward_batch(calls), self.device, runs,
                                   lambda: self.middle.forward_batch(calls))
                out[b] = BatchStep(layer_s=layer_s, lm_head_s=max(0.0, last_s - layer_s))
        return out


class BoxProbe:
    """The box's speed now: a whole-model decode step (every layer and the LM head, one token) at
    each plan's thread count, timed exactly as the calibration the plans came from timed it, so a
    run can time it before each round and read each prediction at the box's speed of the moment. A
    CPU's speed drifts within minutes (Intel Xeon, 2 cores, 2026-12-07: a 1-thread step 60 to 82 ms
    within ten minutes), more than a prediction may be off. `plans`: ppsd_ray.plan.Plan objects,
    all on one device and dtype."""

    def __init__(self, model_dir: Path, plans: Iterable):
        plans = list(plans)
        device, dtype = plans[0].device, plans[0].dtype
        if any((p.device, p.dtype) != (device, dtype) for p in plans):
            raise ValueError("BoxProbe: plans on one device and dtype")
        threads = sorted({p.threads for p in plans})
        num_layers = frozen_parts(model_dir)[2].num_hidden_layers
        # what the plans predicted from
        self.calibrated_ms = {t: 1e3 * calibration(model_dir, device, t, dtype, set()).whole_step_s(num_layers)
                              for t in threads}
        self.timers = {t: StageTimer(Path(model_dir), device, t, dtype, 1, batched=False) for t in threads}
        self.probes_ms: list[dict[str, float]] = []

    def time(self) -> dict[str, float]:
        """Each thread count's whole-model step now, in ms, by thread count as JSON keys it (str)."""
        now = {str(t): 1e3 * timer.steps((1,))[1].whole_step_s(timer.num_layers) for t, timer in self.timers.items()}
        self.probes_ms.append(now)
        return now

    def record(self) -> dict:
        """For a run's JSON: what the plans predicted from, and every timing since."""
        return {"calibrated_ms": {str(t): ms for t, ms in self.calibrated_ms.items()}, "probes_ms": self.probes_ms}


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


if __name__ == "__main__" and sys.argv[1:2] == ["busy"]:  # a peer of contention()
    _busy(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
