"""Kill stage processes at random moments during generations; every output must equal the
uninterrupted one. Writes bench/results/kills.json, which `ppsd bench` puts into BENCHMARKS.md.

    python bench/kill_stages.py --kills 20                      # the default model, K=3, both transports, both vias
    python bench/kill_stages.py --kills 3 --model DIR --max-new-tokens 32 --via serve

Through the Python API (--via python), each kill: a prompt from the bench suite, a mode (ppsd or
eesd), a random stage and a random token count after which its process gets SIGKILL. Through
Serve (--via serve), --clients streaming clients ask /v1/completions for the same prompts in turn
while a random stage is killed at random moments, each once the pipeline was repaired from the
one before (ppsd_ray.loadtest.streams_with_kills). Ray restarts the stage in its bundle and the
coordinator repairs the pipeline; every request goes on from its committed tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def through_python(config, prompts: list[list[int]], args, rng: random.Random) -> KillReport:
    """One stream per kill, alone: the kill comes after a random number of its tokens."""
    import ray
    from tqdm import tqdm

    from actors.pipeline import Pipeline
    from ppsd_ray.config import GenerationConfig
    from ppsd_ray.loadtest import KillReport

    with Pipeline(config) as pipe:
        gens = {m: GenerationConfig(mode=m, max_new_tokens=args.max_new_tokens, stop_on_eos=False)
                for m in ("ppsd", "eesd")}
        reference = [pipe.generate(ids, gens["ppsd"]).token_ids for ids in prompts]
        identical, repairs, errors, t0 = 0, 0, [], time.perf_counter()
        for _ in tqdm(range(args.kills), desc=f"kills ({config.transport.value}, python)"):
            i, mode = rng.randrange(len(prompts)), rng.choice(["ppsd", "eesd"])
            victim, after = rng.randrange(args.stages), rng.randrange(1, args.max_new_tokens - 1)
            tokens = []
            try:
                for item in pipe.stream(prompts[i], gens[mode]):
                    if isinstance(item, dict):
                        repairs += item["repairs"]
                        break
                    tokens.append(item)
                    if len(tokens) == after:
                        os.kill(ray.get(pipe.stages[victim].ready.remote())["pid"], signal.SIGKILL)
            except Exception as e:
                errors.append({"message": f"{type(e).__name__}: {e}", "tokens": len(tokens)})
            identical += tokens == reference[i]
        wall = time.perf_counter() - t0
        leaked = any(ray.get([s.sequences.remote() for s in pipe.stages]))
    return KillReport(kills=args.kills, streams=args.kills, hit=args.kills, identical=identical, errors=errors,
                      repairs=repairs, leaked=leaked, wall_s=wall)


def through_serve(config, prompts: list[list[int]], args, url: str) -> KillReport:
    """An application of its own on the running Serve, deleted afterwards."""
    from ray import serve

    from actors.serve import build_app
    from ppsd_ray.loadtest import Client, streams_with_kills

    name = f"kills-{config.transport.value}"
    serve.run(build_app({"pipeline": config.model_dump(mode="json"), "max_tokens_limit": args.max_new_tokens}),
              name=name, route_prefix="/")
    try:
        return streams_with_kills(Client(url), prompts, args.max_new_tokens, args.clients, args.kills, args.seed)
    finally:
        serve.delete(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--kills", type=int, default=20, help="kills per transport and via")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--transports", default="direct,ray")
    p.add_argument("--via", default="python,serve", help="python (Pipeline.stream), serve (streaming HTTP clients)")
    p.add_argument("--clients", type=int, default=4, help="concurrent streaming clients through serve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kills.json")
    args = p.parse_args()

    import ray
    from ray import serve

    from ppsd_ray.bench import SUITE, machine_info
    from ppsd_ray.config import PipelineConfig
    from ppsd_ray.model import encode_prompt, load_tokenizer, resolve_model
    from ppsd_ray.prompts import read_prompts

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    prompts = [encode_prompt(tokenizer, q.prompt) for q in read_prompts(SUITE)][:6]
    rng = random.Random(args.seed)
    vias = args.via.split(",")
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    result = {"setup": machine_info() | {"model_dir": str(model_dir), "stages": args.stages,
                                         "max_new_tokens": args.max_new_tokens, "clients": args.clients,
                                         "command": " ".join(sys.argv)},
              "runs": []}
    try:
        if "serve" in vias:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        for transport in args.transports.split(","):
            # every kill may hit the same stage: its restart budget must cover all of them
            config = PipelineConfig(model_dir=model_dir, stages=args.stages, transport=transport,
                                    max_restarts=args.kills)
            for via in vias:
                run = (through_python(config, prompts, args, rng) if via == "python"
                       else through_serve(config, prompts, args, f"http://127.0.0.1:{port}"))
                result["runs"].append({"transport": transport, "via": via, **asdict(run)})
                print(f"{transport}, {via}: {run.kills} kills, {run.identical}/{run.streams} outputs identical to "
                      f"the uninterrupted ones, {len(run.errors)} errors, {run.repairs} repairs", file=sys.stderr)
    finally:
        if "serve" in vias:
            serve.shutdown()
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    ok = all(r["kills"] == args.kills and r["identical"] == r["streams"] and not r["errors"] and not r["leaked"]
             for r in result["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
