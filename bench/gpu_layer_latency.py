#!/usr/bin/env python3
"""Per-layer decode latency of random-weight Llama models of published shapes (batch 1).

Standalone: imports only torch, transformers and the standard library (no ray, no ppsd_ray,
no internet), so it can run on a bare GPU machine. For each shape it builds models with a few
layer counts, prefills a 64-token prompt, warms up, times single-token greedy decode steps
(KV cache growing), and fits latency = fixed + per_layer * layers by least squares.
See docs/gpu.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

# name: (hidden, full layers, heads, kv heads, intermediate, vocab, layer counts to measure)
SHAPES = {
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, [2, 4, 8, 16, 32]),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000, [2, 4, 8, 16, 40]),
    "llama2-70b": (8192, 80, 64, 8, 28672, 32000, [2, 4, 8, 16]),
    "tiny": (64, 4, 4, 2, 128, 512, [2, 4]),  # CPU smoke test
}

FWD_PARAMS = inspect.signature(LlamaForCausalLM.forward).parameters
# transformers 5.17 calls the cache argument past_key_values; 5.24 renamed it to cache.
CACHE_KW = "past_key_values" if "past_key_values" in FWD_PARAMS else "cache"


def build(shape: str, layers: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    hidden, _, heads, kv, inter, vocab, _ = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created directly in dtype on the device
    try:
        with device:
            model = LlamaForCausalLM(cfg)  # post_init draws normal(0, 0.02) weights: fast on GPU
    finally:
        torch.set_default_dtype(old)
    model.eval()
    for p in model.parameters():  # guarantee finite weights, whatever the init did
        if not torch.isfinite(p).all():
            p.normal_(0.0, 0.02)
    return model


def new_cache(model) -> DynamicCache:
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_ms(model, device, prompt_len: int, steps: int, warmup: int, reps: int) -> float:
    """Median ms of one greedy decode step; each repetition re-prefills a fresh cache
    (so every repetition covers the same cache lengths prompt_len .. prompt_len + steps)."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)

    def run(n: int, record: list | None) -> None:
        cache = new_cache(model)
        out = model(input_ids=prompt, use_cache=True, **{CACHE_KW: cache})
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(n):
            sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=tok, use_cache=True, **{CACHE_KW: cache})
            tok = out.logits[:, -1:].argmax(-1)
            sync(device)
            if record is not None:
                record.append((time.perf_counter() - t0) * 1e3)
        if not torch.isfinite(out.logits).all():
            raise RuntimeError("non-finite logits")

    left = warmup
    while left > 0:  # warm-up, in chunks of at most `steps` so cache lengths stay as measured
        run(min(left, steps), None)
        left -= steps
    times: list[float] = []
    for _ in range(reps):
        run(steps, times)
    return statistics.median(times)


@torch.inference_mode()
def lm_head_ms(model, device, n: int) -> float:
    h = torch.randn(1, 1, model.config.hidden_size, device=device, dtype=model.lm_head.weight.dtype)
    times = []
    for i in range(n + 10):
        sync(device)
        t0 = time.perf_counter()
        model.lm_head(h).argmax(-1)
        sync(device)
        if i >= 10:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x; returns (intercept a, slope b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="llama2-7b,llama2-13b,llama2-70b",
                    help="comma-separated, from: " + ", ".join(SHAPES))
    ap.add_argument("--layers", default="", help="override layer counts for all shapes, e.g. 2,4,8")
    ap.add_argument("--dtype", default=None, help="bfloat16 (cuda default) or float32 (cpu default)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per repetition")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=64, help="untimed decode steps after building")
    ap.add_argument("--budget-s", type=float, default=280.0, help="skip remaining configs past this")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "dtype": str(dtype).replace("torch.", ""),
        "batch": 1, "prompt_len": a.prompt_len, "steps": a.steps, "reps": a.reps, "warmup": a.warmup,
        "attention": "sdpa", "cache_kwarg": CACHE_KW, "command": " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "shapes": {}, "skipped": [],
    }
    for shape in [s.strip() for s in a.shapes.split(",") if s.strip()]:
        hidden, full, heads, kv, inter, vocab, counts = SHAPES[shape]
        if a.layers:
            counts = [int(x) for x in a.layers.split(",")]
        res = {"hidden": hidden, "full_layers": full, "heads": heads, "kv_heads": kv,
               "intermediate": inter, "vocab": vocab, "ms_per_token": {}}
        for n in counts:
            if time.perf_counter() - t_start > a.budget_s:
                report["skipped"].append(f"{shape}:{n}")
                print(f"[budget] skipping {shape} with {n} layers", flush=True)
                continue
            t0 = time.perf_counter()
            model = build(shape, n, device, dtype)
            ms = decode_ms(model, device, a.prompt_len, a.steps, a.warmup, a.reps)
            res["ms_per_token"][str(n)] = round(ms, 4)
            if "lm_head_ms" not in res:
                res["lm_head_ms"] = round(lm_head_ms(model, device, a.steps), 4)
            del model
            free(device)
            print(f"{shape:11s} layers={n:3d} {ms:9.3f} ms/token ({time.perf_counter() - t0:.1f} s; "
                  f"elapsed {time.perf_counter() - t_start:.1f} s)", flush=True)
        if len(res["ms_per_token"]) >= 2:
            xs = [int(k) for k in res["ms_per_token"]]
            fixed, per_layer = fit(xs, list(res["ms_per_token"].values()))
            res.update(per_layer_ms=round(per_layer, 4), fixed_ms=round(fixed, 4),
                       projected_full_ms=round(fixed + per_layer * full, 4))
            print(f"{shape:11s} per-layer {per_layer:.4f} ms, fixed {fixed:.3f} ms, lm_head "
                  f"{res['lm_head_ms']:.3f} ms, projected {full} layers {res['projected_full_ms']:.3f} ms/token",
                  flush=True)
        report["shapes"][shape] = res
    report["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(f"elapsed {report['elapsed_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
