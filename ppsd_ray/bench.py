"""`ppsd bench`: every system side by side on one prompt suite, interleaved, medians.

Systems: transformers greedy `generate` (what a user would pick instead),
transformers assisted generation with `assistant_early_exit=E` (its own
early-exit self-speculation), this project's ar, pp, eesd and ppsd modes, `default`
(what `ppsd generate` runs with no options: the plan's choice) and `ar-1core` (ar on
one thread: one CPU "device", the base of the per-device figure) and `ar-actor` (ar's stage in
a Ray actor, where one stage for one sequence otherwise runs in this process). Beside each of
our systems, the tokens/s the plan (ppsd_ray/plan.py) predicts for it.
Each prompt runs every system in turn (order rotated per prompt and repetition);
every run is checked token for token against transformers' greedy output.
"""
from __future__ import annotations

import os
import platform
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from actors.pipeline import Pipeline

from .cluster import start_ray
from .config import GenerationConfig, PipelineConfig
from .heads import describe_head
from .model import encode_prompt, load_tokenizer
from .calibrate import BoxProbe, forget
from .plan import predict
from .prompts import Prompt
from .simulate import Timing, calibrate_hop, decode_step_times, simulate
from .theory import eesd_speedup, ppsd_speedup

SUITE = Path(__file__).parent / "data" / "bench.jsonl"
DEFAULT_SYSTEMS = ("hf,hf-ee,ar,pp-K2,pp-K2/ray,ppsd-K2,ppsd-K2/ray,eesd-K2-g2,ppsd-K2@lm,ppsd-K2-t0.7,"
                   "ppsd-K2-t1.0,pp-K3,pp-K3/ray,ppsd-K3,ppsd-K3/ray,pp-K4,pp-K4/ray,ppsd-K4,ppsd-K4/ray")


@dataclass(frozen=True)
class System:
    name: str
    kind: str          # "hf", "hf-ee" or "pipeline"
    stages: int = 1
    mode: str = "ar"
    gamma: int = 4
    head: str | None = None  # None: the run's head for this K; "lm" for a "...@lm" system
    transport: str = "direct"
    temperature: float = 0.0
    threads: int | None = None  # per stage; None: the cores shared out
    in_process: bool | None = None  # PipelineConfig.in_process ("ar-actor": False, one stage in a Ray actor)

    @property
    def pp_base(self) -> str:
        """The same stages and transport without speculation."""
        return f"pp-K{self.stages}" + ("/ray" if self.transport == "ray" else "")


def parse_systems(spec: str, transport: str = "direct") -> list[System]:
    """hf, hf-ee, default, ar-1core, ar-actor, ar, or MODE-K<k>[-g<gamma>][@lm][/ray|/direct][-t<temperature>],
    e.g. ppsd-K2/ray-t0.7."""
    out = []
    for name in spec.split(","):
        if name in ("hf", "hf-ee"):
            out.append(System(name, name))
        elif name == "default":
            out.append(System(name, "pipeline", 0, "auto", transport=transport))
        elif name == "ar-1core":
            out.append(System(name, "pipeline", 1, "ar", transport=transport, threads=1))
        elif name == "ar-actor":
            out.append(System(name, "pipeline", 1, "ar", transport=transport, in_process=False))
        elif m := re.fullmatch(r"(ar|pp|ppsd|eesd)(?:-K(\d+))?(?:-g(\d+))?(@lm)?(?:/(ray|direct))?(?:-t([\d.]+))?",
                               name):
            mode, k, gamma = m.group(1), int(m.group(2) or 1), int(m.group(3) or 4)
            if (mode == "eesd") != (m.group(3) is not None):
                raise ValueError(f"systems: {name}: a gamma (-gN) goes with eesd only")
            if (mode == "ar") != (m.group(2) is None):
                raise ValueError(f"systems: {name}: ar runs on one stage; the other modes name K (-K2)")
            out.append(System(name, "pipeline", k, mode, gamma, "lm" if m.group(4) else None,
                              m.group(5) or transport, float(m.group(6) or 0)))
        else:
            raise ValueError(f"systems: unknown system {name!r} (e.g. hf, hf-ee, ar, pp-K2, eesd-K2-g4, ppsd-K3, "
                             "ppsd-K2@lm for the untrained head, ppsd-K2/ray for the ray transport, "
                             "ppsd-K2-t0.7 sampled at temperature 0.7, default, ar-1core, ar-actor)")
    return out


class HFRunner:
    """transformers' own generate, in this process, on all of its threads."""

    def __init__(self, model_dir: Path, exit_layer: int):
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.exit_layer = exit_layer

    def run(self, kind: str, ids: list[int], max_new_tokens: int) -> tuple[list[int], dict]:
        torch = self.torch
        extra = {"assistant_early_exit": self.exit_layer} if kind == "hf-ee" else {}
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=None, **extra)
        wall = time.perf_counter() - t0
        tokens = out[0, len(ids):].tolist()
        return tokens, {"new_tokens": len(tokens), "wall_s": wall, "tokens_per_s": len(tokens) / wall}


def run_bench(model_dir: Path, systems: list[System], prompts: list[Prompt], max_new_tokens: int, reps: int,
              exit_layers: dict[int, int], heads: dict[int, str], progress: bool = True) -> dict:
    """Runs every (repetition, prompt, system); returns the raw records and the set-up."""
    tokenizer = load_tokenizer(model_dir)
    ids = [encode_prompt(tokenizer, p.prompt) for p in prompts]
    hf = HFRunner(model_dir, exit_layers.get(2, exit_layers[min(exit_layers)]))

    def head_of(s: System) -> str:
        return s.head or heads.get(s.stages, "auto")

    def key(s: System) -> tuple:
        return s.stages, head_of(s), s.transport, s.threads, s.in_process

    def config_of(k, head, transport, threads, in_process) -> PipelineConfig:
        # many pipelines at once on one machine: a small CPU reservation each, or Ray runs out;
        # one request at a time, as `ppsd generate` runs one prompt (the load sweep batches)
        common = dict(model_dir=model_dir, transport=transport, cpus_per_stage=0.01, max_num_seqs=1,
                      threads_per_stage=threads, in_process=in_process)
        if not k:  # default: everything as `ppsd generate` plans it
            return PipelineConfig(**common)
        return PipelineConfig(stages=k, exit_layer=exit_layers.get(k), head=head, **common)

    pipelines = {}  # one per (K, head, transport, threads); modes share it
    predicted = {}  # system -> the plan's predicted decode tokens/s and stage steps
    plans = []  # those predicted from, whose calibrations the box's speed is read against
    forget(model_dir)  # predictions from a calibration measured now: a CPU's speed drifts within hours
    # every plan before Ray starts, as `ppsd generate` plans. Timed beside Ray's starting processes
    # and loading stages, a 2-thread step came out 64 ms, slower than one thread's 61, and the default
    # planned ar on one thread: 0.90x of ar on two (Intel Xeon, 2026-12-07; the run before: 49 ms)
    # Planned without Ray, though, every prediction leaves out what Ray's daemons cost the stages (README).
    planned = {s.name: predict(config_of(*key(s)), s.mode) for s in systems if s.kind == "pipeline"}
    for s in systems:
        plan = planned.get(s.name)
        if plan is not None and s.mode != "eesd":  # the plan models ppsd, pp and ar (auto never picks eesd)
            predicted[s.name] = {"tokens_per_s": 1 / plan.token_s, "threads": plan.threads,
                                 "stage_step_ms": [1e3 * x for x in plan.stage_s]}
            plans.append(plan)
    started_ray = start_ray()  # one Ray for all pipelines
    for s in systems:
        if s.kind == "pipeline" and key(s) not in pipelines:
            plan = planned[s.name]
            pipelines[key(s)] = Pipeline(config_of(*key(s)), plan=plan if s.mode == "auto" else None)

    def run_one(system: System, prompt_ids: list[int], n: int, timeline: bool = False, seed: int = 0):
        if system.kind != "pipeline":
            return hf.run(system.kind, prompt_ids, n)
        pipe = pipelines[key(system)]
        mode = pipe.plan.mode if system.mode == "auto" else system.mode
        gen = GenerationConfig(mode=mode, gamma=system.gamma, max_new_tokens=n, stop_on_eos=False,
                               timeline=timeline, temperature=system.temperature, seed=seed)
        result = pipe.generate(prompt_ids, gen)
        return result.token_ids, result.stats

    try:
        for s in systems:  # warm-up: first calls pay for lazy initialisation
            run_one(s, ids[0], 8)
        probe = BoxProbe(model_dir, plans) if plans else None
        reference = {}
        records = []
        bar = tqdm(total=reps * len(prompts) * len(systems), desc="bench", disable=not progress)
        for rep in range(reps):
            for i, (prompt, prompt_ids) in enumerate(zip(prompts, ids)):
                shift = (rep + i) % len(systems)
                box_ms = probe.time() if probe else {}
                for system in systems[shift:] + systems[:shift]:
                    tokens, stats = run_one(system, prompt_ids, max_new_tokens, seed=rep * len(prompts) + i)
                    if system.name == "hf":
                        reference.setdefault(i, tokens)
                    records.append({"system": system.name, "prompt": i, "category": prompt.category,
                                    "rep": rep, "tokens": tokens, "stats": stats, "box_ms": box_ms})
                    bar.update()
        bar.close()
        timeline = None
        ppsd = [s for s in systems if s.mode == "ppsd" and not s.temperature]
        if ppsd:  # one request with every stage call's timestamps, for the timeline plot
            _, stats = run_one(ppsd[0], ids[0], min(max_new_tokens, 48), timeline=True)
            timeline = {"system": ppsd[0].name, "stats": stats}
    finally:
        for p in pipelines.values():
            p.shutdown()
        if started_ray:
            ray.shutdown()
    sampled = {s.name for s in systems if s.temperature}
    for r in records:  # lossless check against transformers' greedy output (sampled runs: None)
        r["lossless"] = None if r["system"] in sampled else r["tokens"] == reference.get(r["prompt"], r["tokens"])
    return {"setup": machine_info() | {"model_dir": str(model_dir), "max_new_tokens": max_new_tokens,
                                       "reps": reps, "prompts": len(prompts),
                                       "systems": [asdict(s) for s in systems],
                                       "exit_layers": exit_layers,
                                       "heads": {f"K={k} {h}": describe_head(p.plan.head)
                                                 for (k, h, *_), p in pipelines.items() if k},
                                       "default_plan": next((p.plan.describe() for (k, *_), p in pipelines.items()
                                                             if not k), None),
                                       "predicted": predicted, "box": probe.record() if probe else {},
                                       "in_process": [s.name for s in systems if s.kind == "pipeline"
                                                      and pipelines[key(s)].plan.in_process]},
            "records": records, "timeline": timeline}


def machine_info() -> dict:

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = ""
    if Path("/proc/meminfo").exists():
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__}


# ---- analysis -------------------------------------------------------------------------------

def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(result: dict, num_layers: int) -> dict:
    """Per system (and per category): median tokens/s, speedups, acceptance, ideal, efficiency,
    time breakdown; and the simulator's prediction for each ppsd system."""
    systems = [System(**s) for s in result["setup"]["systems"]]
    records = result["records"]
    categories = sorted({r["category"] for r in records})
    exit_layers = {int(k): v for k, v in result["setup"]["exit_layers"].items()}

    def rows(name, category=None):
        return [r for r in records if r["system"] == name and (category is None or r["category"] == category)]

    def tps(name, category=None):
        # per prompt: median over repetitions; then the median over prompts
        by_prompt = {}
        for r in rows(name, category):
            by_prompt.setdefault(r["prompt"], []).append(r["stats"]["tokens_per_s"])
        return _median([_median(v) for v in by_prompt.values()])

    hops = {}  # per (K, transport); each run against its own stage steps: runs differ more than hops
    for s in systems:
        if s.mode == "pp":
            hops[s.stages, s.transport] = _median([
                calibrate_hop(decode_step_times(r["stats"]["stages"]),
                              (r["stats"]["wall_s"] - r["stats"]["prefill_s"]) / (r["stats"]["new_tokens"] - 1))
                for r in rows(s.name)])
    hop_any = _median(list(hops.values())) if hops else 0.0

    out = {"systems": {}, "categories": categories, "hop_s": {f"K{k}/{t}": h for (k, t), h in hops.items()}}
    for s in systems:
        lossless = [r["lossless"] for r in rows(s.name)]
        entry = {"stages": s.stages, "mode": s.mode, "kind": s.kind, "transport": s.transport,
                 "temperature": s.temperature, "lossless": None if None in lossless else all(lossless)}
        for cat in [None, *categories]:
            key = cat or "all"
            t = tps(s.name, cat)
            c = {"tokens_per_s": t, "speedup_vs_hf": t / tps("hf", cat) if rows("hf") else None,
                 "speedup_vs_ar": t / tps("ar", cat) if rows("ar") else None,
                 # K stages of one core each against ar on one core: what K separate devices would give
                 "per_device": t / tps("ar-1core", cat) if rows("ar-1core") and s.threads is None
                 and s.stages > 1 else None}
            rs = rows(s.name, cat)
            if s.kind == "pipeline" and s.mode in ("ppsd", "eesd"):
                drafted = sum(r["stats"]["drafted"] for r in rs)
                alpha = sum(r["stats"]["accepted"] for r in rs) / drafted if drafted else 0.0
                base = s.pp_base
                measured = t / tps(base, cat) if rows(base) else None
                ideal = (ppsd_speedup(alpha, s.stages) if s.mode == "ppsd"
                         else eesd_speedup(alpha, s.gamma, exit_layers[s.stages] / num_layers))
                c |= {"acceptance": alpha, "speedup_vs_pp": measured, "ideal": ideal,
                      "efficiency": measured / ideal if measured else None}
            entry[key] = c
        rs = rows(s.name)
        planned = result["setup"].get("predicted", {}).get(s.name)
        if planned:  # the plan predicts decoding: measured without the prefill
            decode_each = [(r["stats"]["new_tokens"] - 1) / (r["stats"]["wall_s"] - r["stats"]["prefill_s"])
                           for r in rs]
            decode = _median(decode_each)
            entry["plan"] = {"predicted_tokens_per_s": planned["tokens_per_s"], "decode_tokens_per_s": decode,
                             "error": planned["tokens_per_s"] / decode - 1,
                             "predicted_stage_step_ms": planned["stage_step_ms"]}
            # each run against the prediction scaled by the box's speed timed just before its round
            t = str(planned.get("threads"))  # JSON's keys: the thread counts as strings
            calibrated = result["setup"].get("box", {}).get("calibrated_ms", {})
            at_box = [(planned["tokens_per_s"] * calibrated[t] / r["box_ms"][t], d) for r, d in zip(rs, decode_each)
                      if t in calibrated and t in r.get("box_ms", {})]
            if at_box:
                entry["plan"] |= {"box_tokens_per_s": _median([p for p, _ in at_box]),
                                  "box_error": _median([p / d - 1 for p, d in at_box])}
        if s.kind == "pipeline":
            tok = [r["stats"]["new_tokens"] for r in rs]
            entry["breakdown_ms_per_token"] = {
                "wall": 1e3 * _median([r["stats"]["wall_s"] / n for r, n in zip(rs, tok)]),
                "stage_compute": [1e3 * _median([r["stats"]["stages"][j]["compute_s"] / n for r, n in zip(rs, tok)])
                                  for j in range(s.stages)],
                "stage_step": [1e3 * _median(col) for col in zip(*(decode_step_times(r["stats"]["stages"]) for r in rs))],
                "stale": 1e3 * _median([r["stats"]["stale_s"] / n for r, n in zip(rs, tok)]),
                "coordinator": 1e3 * _median([(r["stats"]["wall_s"] - r["stats"]["wait_s"]) / n for r, n in zip(rs, tok)]),
                # one token in the pipe (pp, ar): the time no stage computes, each run against itself
                "overhead": 1e3 * _median([(r["stats"]["wall_s"] - sum(r["stats"]["stage_compute_s"])) / n
                                           for r, n in zip(rs, tok)]) if s.mode in ("pp", "ar") else None,
                "hop": 1e3 * hops.get((s.stages, s.transport), hop_any),
            }
        if s.mode == "ppsd" and hops:
            hop = hops.get((s.stages, s.transport), hop_any)
            predicted = []
            for r in rs:
                st = r["stats"]
                sim = simulate(Timing(decode_step_times(st["stages"]), hop), [c == "1" for c in st["trace"]],
                               st["new_tokens"] - 1, window=s.stages)
                predicted.append(st["new_tokens"] / (sim.decode_s + st["prefill_s"]))
            measured = _median([r["stats"]["tokens_per_s"] for r in rs])
            entry["simulator"] = {"predicted_tokens_per_s": _median(predicted), "measured_tokens_per_s": measured,
                                  "error": _median(predicted) / measured - 1}
        out["systems"][s.name] = entry
    ar = out["systems"].get("ar", {}).get("plan")
    for entry in out["systems"].values():  # ranking, which mode auto chooses by: drift cancels in the ratio
        if ar and "plan" in entry:
            entry["plan"]["error_vs_ar"] = (1 + entry["plan"]["error"]) / (1 + ar["error"]) - 1
    return out


def project_gpu(gpu: dict, hop_s: float, transport: str, alphas=(0.6, 0.7, 0.8), tokens: int = 2000,
                seed: int = 0) -> list[dict]:
    """PPSD on K GPUs for published shapes, from measured per-layer decode times: stage j
    costs its layers, one per-call overhead, and the LM head on stage 1 (exit head) and K."""
    plans = [("llama2-7b", 4), ("llama2-13b", 4), ("llama2-70b", 8)]
    out = []
    for shape, k in plans:
        g = gpu["shapes"].get(shape)
        if not g:
            continue
        layers, per_layer, head = g["full_layers"], g["per_layer_ms"] / 1e3, g["lm_head_ms"] / 1e3
        overhead = g["fixed_ms"] / 1e3 - head
        e = round(layers / k)
        bounds = [0, e] + [e + ((layers - e) * i) // (k - 1) for i in range(1, k)]
        stage_s = [(b - a) * per_layer + overhead + head * (j in (0, k - 1))
                   for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        ar_s = layers * per_layer + overhead + head
        for alpha in alphas:
            rng = random.Random(seed)
            trace = [rng.random() < alpha for _ in range(tokens)]
            sim = simulate(Timing(stage_s, hop_s), trace, tokens, window=k)
            out.append({"shape": shape, "stages": k, "exit_layer": e, "alpha": alpha, "transport": transport,
                        "hop_ms": hop_s * 1e3,
                        "ar_ms_per_token": ar_s * 1e3, "ppsd_ms_per_token": sim.decode_s / tokens * 1e3,
                        "speedup": ar_s * tokens / sim.decode_s, "ideal": ppsd_speedup(alpha, k)})
    return out
