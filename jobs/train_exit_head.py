"""Train an early-exit head by self-distillation; write it as a head file with metadata.

    python jobs/train_exit_head.py --exit-layer 15 --head-type linear
    ray job submit --working-dir . -- python jobs/train_exit_head.py --exit-layer 15 --out /shared/h.safetensors

Steps (ppsd_ray/distill.py): the model answers each training prompt --answers times
(the first greedy, the others sampled) over --workers Ray actors, recording the exit
layers' and final hidden states in a dataset cache under the ppsd cache dir; the
same for the validation prompts (greedy only); then the head is trained with
KL(teacher || head) and its validation acceptance measured and recorded in the
file's metadata together with this exact command. Re-running the same command
reuses the data and continues an interrupted training from its checkpoint.

With --teacher-data DIR..., the training data is instead the data job's top-k shards
(`ppsd distill-data`, jobs/distill_data.py): single shuffled positions, batches of
--batch-positions, a loss over the teacher's top-k (distill.topk_loss); a 'linear' head only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ppsd_ray, also under ray job submit
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from ppsd_ray import distill as D  # noqa: E402
from ppsd_ray.heads import SHIPPED_DIR, save_head  # noqa: E402
from ppsd_ray.model import cache_dir, model_fingerprint, resolve_model  # noqa: E402
from ppsd_ray.prompts import PromptsFileError, read_prompts  # noqa: E402

DATA = Path(D.__file__).parent / "data"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--exit-layer", type=int, required=True)
    p.add_argument("--head-type", default="linear", choices=["linear", "layer"])
    p.add_argument("--train-prompts", type=Path, nargs="+",
                   default=[DATA / "heads_train.jsonl", DATA / "heads_train_stdlib.jsonl"])
    p.add_argument("--val-prompts", type=Path, default=DATA / "heads_val.jsonl")
    p.add_argument("--max-prompts", type=int, help="use the first N training prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="response length of the training data")
    p.add_argument("--answers", type=int, nargs="+", default=[2, 1],
                   help="answers per training prompt, the first greedy, the rest sampled; one number per "
                        "--train-prompts file, or one for all")
    p.add_argument("--val-max-new-tokens", type=int, default=64)
    p.add_argument("--data-layers", default="8,10,15",
                   help="exit layers recorded in the dataset (one dataset serves several heads)")
    p.add_argument("--gen-batch", type=int, default=64, help="training data generation batch (validation: 16)")
    p.add_argument("--workers", type=int, default=2, help="generation actors (0: in-process)")
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-seqs", type=int, default=4)
    p.add_argument("--prompt-positions", action="store_true",
                   help="the loss also counts the prompts' positions (about twice the tokens)")
    p.add_argument("--max-records", type=int, help="train on the first N sequences only (data-size studies)")
    p.add_argument("--teacher-data", type=Path, nargs="+",
                   help="train on these `ppsd distill-data` directories (top-k shards) instead of generating")
    p.add_argument("--batch-positions", type=int, default=512, help="with --teacher-data: positions per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training")
    p.add_argument("--out", type=Path, help="head file; default ppsd_ray/heads/<model>.exit<E>.<type>.safetensors")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    command = "python jobs/train_exit_head.py " + shlex.join(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    fp = model_fingerprint(model_dir)
    layers = tuple(sorted({int(x) for x in args.data_layers.split(",") if x} | {args.exit_layer}))
    progress = not args.no_progress
    t0 = time.time()

    answers = args.answers * len(args.train_prompts) if len(args.answers) == 1 else args.answers
    if len(answers) != len(args.train_prompts):
        raise SystemExit("answers: give one number per --train-prompts file, or one for all")
    for f in [*args.train_prompts, args.val_prompts]:  # all of them, before hours of generation
        try:
            read_prompts(f)
        except PromptsFileError as e:
            raise SystemExit(f"prompts: {e}") from None
    train_specs = [D.DataSpec(prompts_file=str(f), exit_layers=layers, max_prompts=args.max_prompts,
                              max_new_tokens=args.max_new_tokens, answers=n, batch_size=args.gen_batch,
                              seed=args.seed) for f, n in zip(args.train_prompts, answers)]
    val_spec = D.DataSpec(prompts_file=str(args.val_prompts), exit_layers=layers,
                          max_new_tokens=args.val_max_new_tokens, seed=args.seed)
    if args.teacher_data and args.head_type != "linear":
        raise SystemExit("teacher-data: top-k shards hold single positions; only a 'linear' head trains on them")
    spec = D.TrainSpec(head_type=args.head_type, epochs=args.epochs, lr=args.lr, batch_seqs=args.batch_seqs,
                       seed=args.seed, max_records=args.max_records, prompt_positions=args.prompt_positions)
    if args.teacher_data:
        try:
            data = D.TopkData(args.teacher_data, args.exit_layer, args.batch_positions, args.seed, spec.bf16)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        train_dirs, train_specs, train = [Path(d).resolve() for d in args.teacher_data], [], None
    else:
        train_dirs = [D.build_dataset(model_dir, s, args.workers, args.threads_per_worker, progress)
                      for s in train_specs]
        train = [r for d, n in zip(train_dirs, answers) for r in D.load_dataset(d, args.exit_layer, n)]
        data = D.SequenceData(train, spec)
    val_dir = D.build_dataset(model_dir, val_spec, args.workers, args.threads_per_worker, progress)
    gen_s = time.time() - t0
    val = D.load_dataset(val_dir, args.exit_layer)

    torch.manual_seed(args.seed)
    head = D.new_head(args.head_type, model_dir, args.exit_layer)
    what = [[d.name for d in train_dirs], answers, args.exit_layer, asdict(spec)]
    if args.teacher_data:
        what = [[str(d) for d in train_dirs], data.size, args.exit_layer, asdict(spec)]
    run_key = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
    run_dir = cache_dir() / "runs" / f"exit{args.exit_layer}-{args.head_type}-{run_key}"
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"data: {', '.join(map(str, train_dirs))} ({data.size}), {val_dir} ({len(val)}); checkpoints: {run_dir}",
          file=sys.stderr)

    seen = train[:: max(1, len(train) // 200)] if train else None  # about 200 training sequences: the gap

    def on_epoch(epoch):
        acc = D.acceptance(head, val)
        fit = D.acceptance(head, seen) if seen is not None else D.topk_agreement(head, data)
        print(f"epoch {epoch}: val greedy {acc['greedy']:.3f} top-2 {acc['top2']:.3f}; "
              f"train greedy {fit['greedy']:.3f}", file=sys.stderr)
        return {"val_greedy": round(acc["greedy"], 4), "val_top2": round(acc["top2"], 4),
                "train_greedy": round(fit["greedy"], 4)}

    t1 = time.time()
    stats = D.train_head(head, data, spec, ckpt=run_dir / "checkpoint.pt", progress=progress,
                         log=lambda m: print(m, file=sys.stderr), on_epoch=on_epoch)
    acc = D.acceptance(head, val)
    meta = {
        "format": 1, "model_fingerprint": fp, "model_name": Path(model_dir).name,
        "hidden_size": head.lm_head.weight.shape[1], "vocab_size": head.lm_head.weight.shape[0],
        "training_tokens": stats["training_tokens"], "training_sequences": len(data.records) if train else None,
        "epochs": args.epochs, "val_greedy_acceptance": round(acc["greedy"], 4),
        "val_top2_acceptance": round(acc["top2"], 4), "val_tokens": acc["tokens"],
        "val_prompts": Path(args.val_prompts).name, "final_kl": round(stats["final_kl"], 4),
        "history": stats["history"], "train_wall_s": stats["train_wall_s"],
        "data": [{**asdict(s), "prompts_file": Path(s.prompts_file).name} for s in train_specs] or
                [{"teacher_data": str(d), **{k: m[k] for k in ("key", "positions", "sources")},
                  "spec": {k: v for k, v in m["spec"].items() if k != "answers_prompts"}}
                 for d in train_dirs for m in [D.read_topk_manifest(d)]],
        "train": asdict(spec), "command": command,
        "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = args.out or SHIPPED_DIR / f"{Path(model_dir).name.lower()}.exit{args.exit_layer}.{args.head_type}.safetensors"
    save_head(head, out, meta)
    print(json.dumps({"out": str(out), "val_greedy": meta["val_greedy_acceptance"],
                      "val_top2": meta["val_top2_acceptance"], "training_tokens": meta["training_tokens"],
                      "data_s": round(gen_s, 1), "train_s": round(time.time() - t1, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
