"""Memory of a pipeline holding many long sequences: each stage process's resident memory with
the model loaded, one short request run and nothing decoding, and the most it reached (sampled every 0.1 s) while N
sequences of P positions were decoded together. Writes bench/results/memory.json.

    python bench/memory.py                       # 32 sequences of 2,048 positions, K=2, the default model
    python bench/memory.py --sequences 4 --positions 256 --model DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_kib(pid: int) -> int:
    """A process's resident memory now (it runs on this node), in KiB. Not VmHWM: loading the
    weights peaks above what serving holds."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise KeyError("VmRSS")


def main() -> None:
    from actors.pipeline import Pipeline
    from ppsd_ray.bench import machine_info
    from ppsd_ray.config import GenerationConfig, PipelineConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--positions", type=int, default=2048, help="prompt + new tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory.json")
    args = p.parse_args()

    config = PipelineConfig(model_dir=args.model, stages=args.stages, max_num_seqs=args.sequences,
                            max_batch_tokens=512, cpus_per_stage=0.01)
    prompt_len = args.positions - args.new_tokens
    vocab = config.info.vocab_size
    # distinct prompts: ids spread over the vocabulary, a different stride per sequence
    prompts = [[(17 + i * 7919 + j * (31 + 2 * i)) % (vocab - 100) + 100 for j in range(prompt_len)]
               for i in range(args.sequences)]
    with Pipeline(config) as pipe:
        pids = [s["pid"] for s in pipe.layout]
        pipe.generate(prompts[0][:64], GenerationConfig(max_new_tokens=4))  # first calls allocate work buffers
        idle = [rss_kib(pid) for pid in pids]
        peak, done = list(idle), threading.Event()

        def sample():
            while not done.wait(0.1):
                peak[:] = [max(p, rss_kib(pid)) for p, pid in zip(peak, pids)]

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        try:
            results = pipe.generate_many(prompts, GenerationConfig(mode="pp" if args.stages > 1 else "ar",
                                                                   max_new_tokens=args.new_tokens,
                                                                   stop_on_eos=False))
        finally:
            done.set()
            sampler.join()
        wall = time.perf_counter() - t0
    kv_mib = args.sequences * args.positions * config.info.kv_bytes_per_token / 2**20
    out = {"setup": machine_info() | {"command": "python bench/memory.py " + " ".join(sys.argv[1:]),
                                      "model_dir": str(config.model_dir), "stages": args.stages,
                                      "sequences": args.sequences, "positions": args.positions,
                                      "kv_budget_gb": config.kv_budget_gb},
           "stage_rss_mib_idle": [k / 1024 for k in idle], "stage_rss_mib_peak": [k / 1024 for k in peak],
           "kv_mib_computed": kv_mib, "wall_s": wall,
           "new_tokens": sum(len(r.token_ids) for r in results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
