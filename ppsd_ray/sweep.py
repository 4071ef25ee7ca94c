"""`ppsd bench --load-sweep 1,4,16,32`: throughput and latency as concurrent clients grow.

Each client level runs every system in turn (order rotated per level): our pipelines
with one streaming request per client, all at once through the Python driver (the
coordinator admits them, the stages batch their calls), and transformers' own batched
generation of the same prompts in one call. Every pipeline answer under load must equal
the same prompt's answer alone on the same pipeline, token for token.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import torch
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig,
                          GenerationConfig as HFGenerationConfig)

from actors.pipeline import Pipeline

from .bench import machine_info
from .calibrate import BoxProbe, forget
from .cluster import start_ray
from .config import GenerationConfig, PipelineConfig
from .kv import keep_freed_memory
from .plan import predict, resolve


@dataclass
class LevelResult:
    """One system at one client count."""
    system: str
    clients: int
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)   # gaps between a request's consecutive tokens
    identical: int = 0   # answers equal to the prompt's answer alone
    compared: int = 0
    errors: list[str] = field(default_factory=list)
    acceptance: float | None = None
    predicted: float | None = None  # our systems: the plan's tokens/s for this many clients
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def run_clients(pipe, prompts: list[list[int]], gen) -> tuple[list[dict], float]:
    """One streaming request per prompt, all at once: per request its tokens, TTFT, token
    gaps and stats (or error); and the wall time from the first start to the last end."""
    out: list[dict] = [{} for _ in prompts]
    go = threading.Barrier(len(prompts) + 1)

    def client(i: int) -> None:
        go.wait()
        t0 = last = time.perf_counter()
        rec = out[i] = {"tokens": [], "gaps": [], "ttft": None, "stats": {}}
        try:
            for item in pipe.stream(prompts[i], gen):
                now = time.perf_counter()
                if isinstance(item, dict):
                    rec["stats"] = item
                    break
                if rec["ttft"] is None:
                    rec["ttft"] = now - t0
                else:
                    rec["gaps"].append(now - last)
                last = now
                rec["tokens"].append(int(item))
        except Exception as e:  # counted, not raised: a load test reports its errors
            rec["error"] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


class HFBatched:
    """transformers' batched generation of the same prompts in one call: `generate_batch`
    (continuous batching, a paged cache) and `generate` on the left-padded batch."""

    def __init__(self, model_dir: Path):
        keep_freed_memory()  # as our CPU stages do: neither side's prefill pays fresh pages
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float]:
        cfg = HFGenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
        # a cache for these requests: unsized, it takes 60% of the free memory on CPU at every call
        # (transformers 5.25), about 11 GB here, and Ray's memory monitor killed our stages for it
        page = ContinuousBatchingConfig.page_size
        cache = ContinuousBatchingConfig(num_blocks=sum(-(-(len(p) + max_new_tokens) // page) for p in prompts),
                                         max_batch_tokens=PipelineConfig.model_fields["max_batch_tokens"].default)
        t0 = time.perf_counter()
        done = self.model.generate_batch(inputs=prompts, generation_config=cfg, continuous_batching_config=cache,
                                         progress_bar=False)
        wall = time.perf_counter() - t0
        return [list(done[k].generated_tokens) for k in sorted(done, key=lambda r: int(r.split("_")[-1]))], wall

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                      eos_token_id=None, pad_token_id=self.pad)
        return out[:, width:].tolist(), time.perf_counter() - t0


class HFProcess:
    """One HFBatched method in a process of its own, started fresh for the sweep: run in the bench's
    process, a baseline shares it with Ray's driver threads and, for `generate`, with whatever
    `generate_batch` left behind (measured, Intel Xeon, 16 prompts: `generate` 117-122 tokens/s
    right after `generate_batch` against 136-140 without). The process waits, idle, while our
    systems run."""

    def __init__(self, model_dir: Path, method: str):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_hf_serve, args=(child, str(model_dir), method), daemon=True,
                                    name=f"hf-{method}")
        self._process.start()
        child.close()

    def __call__(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float]:
        try:
            self._conn.send((prompts, max_new_tokens))
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(timeout=5)
            raise RuntimeError(f"transformers' process ended (exit code {self._process.exitcode})") from None
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(timeout=30)


def _hf_serve(conn, model_dir: str, method: str) -> None:
    run = getattr(HFBatched(Path(model_dir)), method)
    while (job := conn.recv()) is not None:
        try:
            conn.send((True, run(*job)))
        except Exception as e:  # transformers 5.24: "sdpa_paged is not supported" on CPU
            conn.send((False, f"{type(e).__name__}: {str(e)[:120]}"))


def run_sweep(model_dir: Path, levels: list[int], prompts: list[list[int]], max_new_tokens: int,
              exit_layer: int, head: str = "auto", progress: bool = True) -> dict:
    """Systems: ppsd-K2 (drafting at every load), pp-K2, ar (pipelines planned for the most
    clients: stages batched at every level), default (what PipelineConfig's defaults and mode
    auto give when told the concurrency: the plan's mode, K and kernels for that many clients,
    drafting only while at most draft_max_seqs decode; built anew per level), and transformers'
    hf-generate_batch and hf-generate (the padded batch; 1 client: each prompt alone).
    `prompts`: the distinct prompts; a level of c clients sends prompts[i % len(prompts)] for
    i < c. Each of our systems has its predicted tokens/s beside."""
    forget(model_dir)  # as bench.run_bench: plans from a calibration measured now, before Ray starts
    top = max(levels)
    loaded = dict(cpus_per_stage=0.01, max_num_seqs=top, concurrency=top)  # stages batched at every level
    k2_config = PipelineConfig(model_dir=model_dir, stages=2, exit_layer=exit_layer, head=head,
                               draft_max_seqs=None, **loaded)
    k1_config = PipelineConfig(model_dir=model_dir, stages=1, **loaded)
    default_config = PipelineConfig(model_dir=model_dir, cpus_per_stage=0.01, max_num_seqs=top)
    k2_plan = resolve(k2_config, "ppsd")  # its head for drafting, whatever auto plans at load
    k1_plan, default_plan = resolve(k1_config), resolve(default_config)
    for clients in levels:  # each level's default plan, calibrated now
        resolve(default_config.model_copy(update={"concurrency": clients}))
    started = start_ray()
    k2 = Pipeline(k2_config, plan=k2_plan)
    k1 = Pipeline(k1_config, plan=k1_plan)
    default = Pipeline(default_config, plan=default_plan)
    systems = {"ppsd-K2": (k2, "ppsd"), "pp-K2": (k2, "pp"), "ar": (k1, "ar"), "default": (default, "auto")}

    def predicted(name: str, clients: int) -> float | None:
        """Our batched systems at this many clients (1: not predicted, as the plan predicts a
        pipeline planned for one sequence; the default: its own plan)."""
        pipe, mode = systems[name]
        if name == "default":
            return pipe.plan.tokens_per_s
        if clients == 1:
            return None
        return predict(pipe.config.model_copy(update={"concurrency": clients}), mode).tokens_per_s
    hf = {name: HFProcess(model_dir, name.removeprefix("hf-")) for name in ("hf-generate_batch", "hf-generate")}
    results: list[LevelResult] = []
    alone: dict[str, list[list[int]]] = {}
    names = [*systems, "hf-generate_batch", "hf-generate"]
    bar = tqdm(total=len(levels) * len(names), desc="load sweep", disable=not progress)
    try:
        for pipe, mode in systems.values():  # warm-up
            pipe.generate(prompts[0], GenerationConfig(mode=mode, max_new_tokens=4))
        for run in hf.values():
            try:
                run(prompts[:2], 4)
            except RuntimeError:
                pass  # recorded at each level
        probe = BoxProbe(model_dir, [k2.plan, k1.plan, default.plan])
        for li, clients in enumerate(sorted(levels)):
            probe.time()
            batch = [prompts[i % len(prompts)] for i in range(clients)]
            default.shutdown()  # the default for this many clients
            default = Pipeline(default_config.model_copy(update={"concurrency": clients}))
            systems["default"] = (default, "auto")
            default.generate(prompts[0], GenerationConfig(max_new_tokens=4))
            for name in names[li % len(names):] + names[:li % len(names)]:
                r = LevelResult(name, clients)
                if name.startswith("hf-"):
                    calls = [[p] for p in prompts] if clients == 1 else [batch]  # 1: each prompt alone
                    outs = []
                    try:
                        for call in calls:
                            o, wall = hf[name](call, max_new_tokens)
                            outs += o
                            r.wall_s += wall
                    except RuntimeError as e:
                        outs, r.errors = [], [str(e)]
                    r.tokens = sum(len(o) for o in outs)
                else:
                    pipe, mode = systems[name]
                    gen = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, stop_on_eos=False)
                    if clients == 1:  # each distinct prompt alone, one after another: the reference
                        recs, r.wall_s = [], 0.0
                        for p in prompts:
                            rec, wall = run_clients(pipe, [p], gen)
                            recs += rec
                            r.wall_s += wall
                        alone[name] = [rec["tokens"] for rec in recs]
                    else:
                        recs, r.wall_s = run_clients(pipe, batch, gen)
                    for i, rec in enumerate(recs):
                        if "error" in rec:
                            r.errors.append(rec["error"])
                            continue
                        r.tokens += len(rec["tokens"])
                        r.ttft_s.append(rec["ttft"])
                        r.itl_s += rec["gaps"]
                        if clients > 1 and name in alone:
                            r.compared += 1
                            r.identical += rec["tokens"] == alone[name][i % len(prompts)]
                    r.predicted = predicted(name, clients)
                    if name == "default":
                        r.note = f"{pipe.plan.mode.value} on {pipe.plan.stages} stage(s), {pipe.plan.threads} thread(s)"
                    drafted = sum(rec.get("stats", {}).get("drafted", 0) for rec in recs)
                    if drafted:
                        r.acceptance = sum(rec["stats"]["accepted"] for rec in recs) / drafted
                results.append(r)
                bar.update()
        bar.close()
    finally:
        for pipe in (k2, k1, default):
            pipe.shutdown()
        for run in hf.values():
            run.close()
        if started:
            ray.shutdown()
    return {"setup": machine_info() | {"model_dir": str(model_dir), "max_new_tokens": max_new_tokens,
                                       "prompts": len(prompts), "levels": sorted(levels), "exit_layer": exit_layer,
                                       "box": probe.record()},
            "results": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results]}
