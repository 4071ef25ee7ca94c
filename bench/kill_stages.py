"""Kill stage processes at random moments during generations; every output must equal the
uninterrupted one. Writes bench/results/kills.json, which `ppsd bench` puts into BENCHMARKS.md.

    python bench/kill_stages.py --kills 20                      # the default model, K=3, both transports
    python bench/kill_stages.py --kills 3 --model DIR --max-new-tokens 32

Each kill: a prompt from the bench suite, a mode (ppsd or eesd), a random stage and a random
token count after which its process gets SIGKILL. Ray restarts the stage in its bundle and the
coordinator repairs the pipeline; the request goes on from its committed tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--kills", type=int, default=20, help="kills per transport")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--transports", default="direct,ray")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kills.json")
    args = p.parse_args()

    import ray
    from tqdm import tqdm

    from actors.pipeline import Pipeline
    from ppsd_ray.bench import SUITE, machine_info
    from ppsd_ray.config import GenerationConfig, PipelineConfig
    from ppsd_ray.model import encode_prompt, load_tokenizer, resolve_model
    from ppsd_ray.prompts import read_prompts

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    prompts = [encode_prompt(tokenizer, q.prompt) for q in read_prompts(SUITE)][:6]
    rng = random.Random(args.seed)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    result = {"setup": machine_info() | {"model_dir": str(model_dir), "stages": args.stages,
                                         "max_new_tokens": args.max_new_tokens, "command": " ".join(sys.argv)},
              "transports": {}}
    try:
        for transport in args.transports.split(","):
            # every kill may hit the same stage: its restart budget must cover all of them
            config = PipelineConfig(model_dir=model_dir, stages=args.stages, transport=transport,
                                    max_restarts=args.kills)
            with Pipeline(config) as pipe:
                gens = {m: GenerationConfig(mode=m, max_new_tokens=args.max_new_tokens, stop_on_eos=False)
                        for m in ("ppsd", "eesd")}
                reference = {i: pipe.generate(ids, gens["ppsd"]).token_ids for i, ids in enumerate(prompts)}
                identical, repairs, t0 = 0, 0, time.perf_counter()
                for _ in tqdm(range(args.kills), desc=f"kills ({transport})"):
                    i, mode = rng.randrange(len(prompts)), rng.choice(["ppsd", "eesd"])
                    victim, after = rng.randrange(args.stages), rng.randrange(1, args.max_new_tokens - 1)
                    tokens, stats = [], {}
                    for item in pipe.stream(prompts[i], gens[mode]):
                        if isinstance(item, dict):
                            stats = item
                            break
                        tokens.append(item)
                        if len(tokens) == after:
                            os.kill(ray.get(pipe.stages[victim].ready.remote())["pid"], signal.SIGKILL)
                    identical += tokens == reference[i]
                    repairs += stats.get("repairs", 0)
                result["transports"][transport] = {"kills": args.kills, "identical": identical, "repairs": repairs,
                                                   "wall_s": time.perf_counter() - t0}
                print(f"{transport}: {identical}/{args.kills} outputs identical to the uninterrupted ones, "
                      f"{repairs} repairs", file=sys.stderr)
    finally:
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    ok = all(t["identical"] == t["kills"] for t in result["transports"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
