#!/usr/bin/env python3
"""Per-draft cost of exit heads with and without a draft vocabulary, one decode step.

    python bench/draft_cost.py --threads 1 --rounds 300 [--heads ppsd_ray/heads/*.safetensors]

Times, in interleaved rounds (every variant once per round, so that a busy machine
slows them alike; before each call, untimed, a 128 MB read evicts the CPU caches as
a stage's other layers would): the full LM head (final norm, 49152-wide matmul, argmax), the LM
head restricted to each shipped head's draft vocabulary, and each shipped head's
whole draft (its decoder layer over a KV cache of 64 positions, then its draft
logits and argmax) with and without its vocabulary; and stage 1's whole decode step
(ppsd_ray.stage.Stage, layers [0, E) and the head, one token after a 64-token prompt)
with each. Prints median and minimum ms.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ppsd_ray.calibrate import CONTEXT  # noqa: E402
from ppsd_ray.distill import frozen_parts  # noqa: E402
from ppsd_ray.heads import load_exit_head, read_head_meta, shipped_heads  # noqa: E402
from ppsd_ray.model import resolve_model  # noqa: E402
from ppsd_ray.protocol import Work  # noqa: E402
from ppsd_ray.stage import Stage  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--heads", type=Path, nargs="*", default=shipped_heads())
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    norm, lm_head, config = frozen_parts(model_dir)
    x = torch.randn(1, 1, config.hidden_size)
    pos = torch.tensor([[CONTEXT]])
    variants = {"full LM head": lambda: lm_head(norm(x)).argmax(-1)}
    for path in args.heads:
        meta = read_head_meta(path)
        head = load_exit_head(str(path), meta["exit_layer"], norm, lm_head, model_dir=model_dir, config=config)
        cache = head.new_cache()
        if cache is not None:
            head.features(torch.randn(1, CONTEXT, config.hidden_size), torch.arange(CONTEXT)[None], cache)
        full = load_exit_head(str(path), meta["exit_layer"], norm, lm_head, model_dir=model_dir, config=config)
        full.set_draft_vocab(None)
        if head.draft_vocab is not None:
            n = len(head.draft_vocab)
            variants[f"LM head on {n} draft-vocabulary rows"] = (
                lambda h=head: h.draft_tokens(norm(x)))
        for name, h in ((f"{path.name}: whole draft, full vocabulary", full),
                        (f"{path.name}: whole draft, its draft vocabulary", head)):
            if name.endswith("its draft vocabulary") and head.draft_vocab is None:
                continue

            def run(h=h, cache=cache):
                if cache is not None and cache.get_seq_length() > CONTEXT:
                    cache.crop(CONTEXT)
                return h.draft(x, pos, cache)
            variants[name] = run
        for vocab in (False, True):
            if vocab and head.draft_vocab is None:
                continue
            stage = Stage(model_dir, 0, meta["exit_layer"], index=0, num_stages=2, head=str(path),
                          exit_layer=meta["exit_layer"])
            if not vocab:
                stage.exit_head.set_draft_vocab(None)
            stage.forward(Work("s", 0, 0, tuple(range(100, 100 + CONTEXT)), draft=True))

            def stage_step(stage=stage):  # the same position each time: the call first drops it
                return stage.forward(Work("s", 0, CONTEXT, (42,), draft=True))
            variants[f"{path.name}: stage 1 step, {'its draft' if vocab else 'full'} vocabulary"] = stage_step
    times = {k: [] for k in variants}
    evict = torch.ones(32 << 20)
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                evict.sum()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    print(json.dumps({"threads": args.threads, "rounds": args.rounds, "ms": {
        k: {"median": round(1e3 * statistics.median(v), 3), "min": round(1e3 * min(v), 3)} for k, v in times.items()}},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
