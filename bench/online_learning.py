"""Does a serving pipeline's exit head learn from its own traffic? Writes bench/results/online.json.

The same traffic runs twice on a 2-stage ppsd pipeline, `--clients` requests at a time:
coding and maths prompts (ppsd_ray/data/heads_train.jsonl), every other one sampled. First
without learning, then with `learn_drafts` (a fresh version store). Compared: tokens/s of
the traffic with and without learning, and whether each answer is the same. Then, up to
`--wait-s` after the last request, new prompts of the same kind (heads_val.jsonl), one at a
time, greedy: their acceptance with the head the learner has installed by then, against
the head it started from (what `auto` plans with learning: for SmolLM2-135M the shipped
head it would draft with anyway).

    python bench/online_learning.py                     # 200 requests, 8 at a time, 64 tokens
    python bench/online_learning.py --requests 24 --new 4 --model DIR --wait-s 20
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from tqdm import tqdm

    from actors.pipeline import Pipeline
    from ppsd_ray.bench import machine_info
    from ppsd_ray.config import GenerationConfig, LearnConfig, PipelineConfig
    from ppsd_ray.model import encode_prompt, load_tokenizer
    from ppsd_ray.plan import resolve
    from ppsd_ray.data.build_prompts import held_out_traffic
    from ppsd_ray.prompts import Prompt, read_prompts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--new", type=int, default=24, help="new requests of the same kind, after learning")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--wait-s", type=float, default=240.0, help="how long after the traffic the learner may train")
    p.add_argument("--traffic", choices=("held-out", "train"), default="held-out",
                   help="held-out: code and maths prompts from the templates the shipped heads never saw; "
                        "train: heads_train.jsonl's code and maths prompts, which they trained on")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "online.json")
    args = p.parse_args()

    data = REPO / "ppsd_ray" / "data"
    kind = ("code", "math")
    val = read_prompts(data / "heads_val.jsonl")
    if args.traffic == "held-out":
        traffic = [Prompt(**row) for row in held_out_traffic(args.requests, {q.prompt for q in val})]
    else:
        traffic = [q for q in read_prompts(data / "heads_train.jsonl") if q.category in kind][:args.requests]
    new = [q for q in val if q.category in kind][:args.new]
    base = PipelineConfig(model_dir=args.model, stages=2, max_num_seqs=args.clients, concurrency=args.clients,
                          cpus_per_stage=0.01)
    tokenizer = load_tokenizer(base.model_dir)
    traffic_ids = [encode_prompt(tokenizer, q.prompt) for q in traffic]
    new_ids = [encode_prompt(tokenizer, q.prompt) for q in new]
    # every other request sampled, each with its own seed
    gens = [GenerationConfig(mode="ppsd", max_new_tokens=args.max_new_tokens, stop_on_eos=False,
                             temperature=0.7 if i % 2 else 0.0, seed=i) for i in range(len(traffic))]
    greedy = GenerationConfig(mode="ppsd", max_new_tokens=args.max_new_tokens, stop_on_eos=False)

    def serve_traffic(pipe) -> tuple[list, float]:
        t0 = time.perf_counter()
        results = pipe.generate_many(traffic_ids, gens)
        return results, time.perf_counter() - t0

    def acceptance(pipe, desc: str) -> dict:
        drafted = accepted = 0
        versions = set()
        for ids in tqdm(new_ids, desc=desc):
            stats = pipe.generate(ids, greedy).stats
            drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
            versions.add(stats["head_version"])
        return {"acceptance": accepted / max(1, drafted), "drafted": drafted, "head_versions": sorted(versions)}

    learned_config = base.model_copy(update={"learn_drafts": True, "learn": LearnConfig(
        store=Path(tempfile.mkdtemp(prefix="ppsd-online-")))})
    plan = resolve(learned_config)  # the head learning starts from (and its exit layer)
    out = {"setup": machine_info() | {"command": "python bench/online_learning.py " + " ".join(sys.argv[1:]),
                                      "model_dir": str(base.model_dir), "requests": len(traffic),
                                      "clients": args.clients, "new_requests": len(new),
                                      "traffic": args.traffic,
                                      "max_new_tokens": args.max_new_tokens, "plan": plan.describe()}}
    fixed = base.model_copy(update={"exit_layer": plan.exit_layer, "head": plan.head})
    with Pipeline(fixed) as pipe:
        plain, wall = serve_traffic(pipe)
        out["without_learning"] = {"tokens_per_s": sum(len(r.token_ids) for r in plain) / wall, "wall_s": wall,
                                   "new_requests": acceptance(pipe, f"new requests, head {plan.head}")}
    with Pipeline(learned_config.model_copy(update={"exit_layer": plan.exit_layer, "head": plan.head})) as pipe:
        learned, wall = serve_traffic(pipe)
        ended = time.perf_counter()
        status = [(0.0, pipe.learner_status())]
        while time.perf_counter() - ended < args.wait_s:
            time.sleep(10)
            status.append((time.perf_counter() - ended, pipe.learner_status()))
        out["with_learning"] = {
            "tokens_per_s": sum(len(r.token_ids) for r in learned) / wall, "wall_s": wall,
            "same_answers": {"greedy": sum(a.token_ids == b.token_ids for a, b, g in zip(plain, learned, gens)
                                           if g.temperature == 0),
                             "sampled": sum(a.token_ids == b.token_ids for a, b, g in zip(plain, learned, gens)
                                            if g.temperature > 0),
                             "of_each": len(traffic) // 2},
            "traffic_head_versions": {str(v): sum(r.stats["head_version"] == v for r in learned)
                                      for v in sorted({r.stats["head_version"] for r in learned})},
            "learner": [{"after_traffic_s": round(t, 1), "version": s.version, "positions_seen": s.positions_seen,
                         "rounds": s.rounds, "installed": s.installed, "priority": s.priority, "error": s.error,
                         "holdout": None if s.last_round is None else {
                             "candidate": s.last_round.candidate_acceptance,
                             "serving": s.last_round.serving_acceptance,
                             "positions": s.last_round.holdout_positions}} for t, s in status],
            "new_requests": acceptance(pipe, "new requests, learned head")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "setup"}, indent=1))


if __name__ == "__main__":
    main()
