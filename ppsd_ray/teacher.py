"""The distillation data job: teacher-forced text and the model's own answers -> shuffled top-k shards.

    ppsd distill-data --exit-layers 15 --sources stdlib,docs,man,readmes,answers --positions 5000000
    ray job submit --working-dir . -- python jobs/distill_data.py --exit-layers 15 --positions 5000000

(a) Teacher-forced text (ppsd_ray/corpus.py): each chunk of text, wrapped as a chat (a user
question naming the document, the chunk as the assistant's answer) or plain, goes through one
forward of the full model (transformers' own class, fp32, inference mode). Every answer
position gives a training position: the exit layers' hidden states (forward hooks) and the
model's own next-token distribution there (its logits). One forward of N tokens, N positions:
no decoding.
(b) The model's answers (`answers`): distill.py's own generation (greedy, then sampled answers
to the prompts files, cached and resumable there); the teacher's distribution at each answer
position comes from the recorded final hidden state through the model's LM head.

Per position the shards keep the exit hidden states (fp16), the teacher's top-k token ids
(int32) and probabilities (fp16, temperature 1, not renormalised: 1 - their sum is the rest),
the input token and the text's next token, and where it came from (source, chunk, position).
Positions are collected over several batches and written, shuffled with a seeded RNG, as one
shard of at least `shard_positions`; the manifest (written atomically after each shard) lists
the shards and, per source, the chunks they hold, so a re-run skips those chunks and computes
only the rest. A chunk is in exactly one shard, all its positions together.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import corpus
from .distill import DataSpec, build_dataset, frozen_parts, load_dataset, recorder
from .families import decoder
from .model import cache_dir, model_fingerprint

FORMAT = 1
ANSWERS = "answers"
DATA = Path(__file__).parent / "data"


@dataclass
class TeacherSpec:
    """What determines the data (its hash, `key`, is checked on resume). `positions` is not in
    the key: a run with a larger target continues one with a smaller."""
    sources: tuple[str, ...]
    exit_layers: tuple[int, ...]
    positions: int = 1_000_000
    chunk_tokens: int = 512
    chat: bool = True
    topk: int = 32
    shard_positions: int = 65536
    seed: int = 0
    answers_prompts: tuple[str, ...] = (str(DATA / "heads_train.jsonl"),)
    answers: int = 2                 # per prompt: the first greedy, the others sampled
    answers_max_new_tokens: int = 128

    def key(self, model_dir: Path) -> str:
        spec = {k: v for k, v in asdict(self).items() if k != "positions"}
        if ANSWERS in self.sources:
            spec["answers_prompts"] = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in self.answers_prompts]
        else:
            spec = {k: v for k, v in spec.items() if not k.startswith("answers")}
        blob = json.dumps({**spec, "model": model_fingerprint(model_dir), "format": FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_spec(spec: TeacherSpec, num_layers: int) -> None:
    """ValueError naming the field, before anything runs."""
    if not spec.sources:
        raise ValueError("sources: give at least one")
    for s in spec.sources:
        if s != ANSWERS:
            corpus.check_source(s)
    if len(set(spec.sources)) != len(spec.sources):
        raise ValueError("sources: a source is named twice")
    if not spec.exit_layers or any(not 1 <= e < num_layers for e in spec.exit_layers):
        raise ValueError(f"exit_layers: each must be in [1, {num_layers - 1}], got {list(spec.exit_layers)}")
    for name in ("positions", "chunk_tokens", "topk", "shard_positions", "answers", "answers_max_new_tokens"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name}: must be >= 1")


def default_out(model_dir: Path, spec: TeacherSpec) -> Path:
    return cache_dir() / "teacher" / f"{Path(model_dir).name}-{spec.key(model_dir)}"


@dataclass
class _Work:
    """One chunk's positions, ready to be buffered."""
    source: int
    chunk: int
    hidden: dict[str, torch.Tensor]        # exit{E}: [n, H] fp16
    ids: torch.Tensor                      # [n] input token
    next_ids: torch.Tensor                 # [n] the text's next token
    pos: torch.Tensor                      # [n] position in the chunk's sequence
    topk_ids: torch.Tensor                 # [n, k]
    topk_probs: torch.Tensor               # [n, k]


@dataclass
class _Stats:
    forwards: int = 0
    positions: int = 0
    per_source: dict = field(default_factory=dict)


class Teacher:
    """The full model with hooks on the exit layers: chunks in, per-position data out."""

    def __init__(self, model_dir: Path, exit_layers: tuple[int, ...], topk: int):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.exit_layers, self.topk = tuple(exit_layers), topk
        pad = self.model.config.pad_token_id
        self.pad = (pad[0] if isinstance(pad, list) else pad) if pad is not None else 0
        self.forwards = 0

    @torch.inference_mode()
    def run(self, chunks: list[corpus.Chunk]) -> list[tuple[corpus.Chunk, dict]]:
        """One forward over a right-padded batch of chunks; per chunk its kept positions."""
        width = max(len(c.ids) for c in chunks)
        inp = torch.full((len(chunks), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, c in enumerate(chunks):
            inp[i, : len(c.ids)] = torch.tensor(c.ids)
            mask[i, : len(c.ids)] = 1
        taken: dict[str, list] = {f"exit{e}": [] for e in self.exit_layers}
        body = decoder(self.model)
        hooks = [body.layers[e - 1].register_forward_hook(recorder(taken[f"exit{e}"])) for e in self.exit_layers]
        try:
            logits = self.model(input_ids=inp, attention_mask=mask, use_cache=False).logits
        finally:
            for h in hooks:
                h.remove()
        self.forwards += 1
        out = []
        for i, c in enumerate(chunks):
            sl = slice(c.start, len(c.ids) - 1)
            probs, ids = torch.softmax(logits[i, sl].float(), dim=-1).topk(self.topk, dim=-1)
            out.append((c, {"hidden": {k: v[0][i, sl].to(torch.float16) for k, v in taken.items()},
                            "topk_ids": ids.to(torch.int32), "topk_probs": probs.to(torch.float16)}))
        return out


def _answer_positions(records: list[dict], exit_layers, lm_head, topk: int):
    """distill records -> per record the same per-position data (teacher from the final hidden state)."""
    for n, r in enumerate(records):
        p, seq = r["prompt_len"], r["ids"]
        sl = slice(p - 1, len(seq) - 1)
        with torch.inference_mode():
            probs, ids = torch.softmax(lm_head(r["final"][sl].float()).float(), dim=-1).topk(topk, dim=-1)
        yield n, seq, sl, {"hidden": {f"exit{e}": r[f"exit{e}"][sl].to(torch.float16) for e in exit_layers},
                           "topk_ids": ids.to(torch.int32), "topk_probs": probs.to(torch.float16)}


def build_teacher_forced(model_dir: Path, spec: TeacherSpec, out: Path | None = None, batch_size: int = 4,
                         threads: int | None = None, workers: int = 0, progress: bool = True,
                         stop_after_shards: int | None = None) -> dict:
    """Writes (or completes) the data; returns the manifest. stop_after_shards: stop after
    writing that many shards in this call (tests: an interrupted run)."""
    model_dir = Path(model_dir)
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    check_spec(spec, num_layers)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out) if out is not None else default_out(model_dir, spec)
    out.mkdir(parents=True, exist_ok=True)
    key = spec.key(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    text_sources = [s for s in spec.sources if s != ANSWERS]
    docs = {s: corpus.documents(s) for s in text_sources}
    fingerprints = {s: corpus.corpus_fingerprint(d) for s, d in docs.items()}
    manifest = _read_manifest(out)
    if manifest is None:
        manifest = {"format": FORMAT, "key": key, "spec": asdict(spec), "model_dir": str(model_dir),
                    "model_fingerprint": model_fingerprint(model_dir), "corpus": fingerprints, "shards": [],
                    "done": {s: [] for s in spec.sources}, "sources": {s: {"chunks": 0, "positions": 0}
                                                                        for s in spec.sources},
                    "positions": 0, "forwards": 0, "wall_s": 0.0}
    elif manifest["key"] != key:
        raise ValueError(f"out: {out} holds data of other settings (key {manifest['key']}, these {key}); "
                         "give another --out")
    elif manifest["corpus"] != fingerprints:
        changed = [s for s in fingerprints if manifest["corpus"].get(s) != fingerprints[s]]
        raise ValueError(f"sources: {', '.join(changed)} changed on this machine since {out} was started; "
                         "its chunks would not be the same: give another --out")
    for f in out.glob("shard-*"):  # written but never recorded: an interrupted write
        if f.name not in {s["file"] for s in manifest["shards"]}:
            f.unlink()
    manifest["spec"]["positions"] = spec.positions
    done = {s: set(v) for s, v in manifest["done"].items()}

    records, lm_head = [], None
    if ANSWERS in spec.sources:  # distill's generation: cached shards, resumable on its own
        for f in spec.answers_prompts:
            dspec = DataSpec(prompts_file=str(f), exit_layers=tuple(spec.exit_layers), answers=spec.answers,
                             max_new_tokens=spec.answers_max_new_tokens, seed=spec.seed)
            records += _load_all_layers(build_dataset(model_dir, dspec, workers, threads or 1, progress), spec)
        lm_head = frozen_parts(model_dir)[1]

    streams = {s: corpus.chunks(tok, s, spec.seed, spec.chunk_tokens, spec.chat, docs=docs[s]) for s in text_sources}
    answer_stream = _answer_positions(records, spec.exit_layers, lm_head, spec.topk) if records else iter(())
    src_index = {s: i for i, s in enumerate(spec.sources)}
    teacher: Teacher | None = None
    t0 = time.perf_counter()
    wall0 = manifest["wall_s"]
    planned = 0  # positions of the chunks planned so far, written or not
    buffer: list[_Work] = []
    pending: list[corpus.Chunk] = []
    new_positions = 0
    written = 0
    bar = tqdm(total=spec.positions, initial=min(manifest["positions"], spec.positions), unit="pos",
               desc=f"distill-data {out.name}", disable=not progress, unit_scale=True)

    def flush(force=False):
        nonlocal buffer, written
        n = sum(len(w.ids) for w in buffer)
        if not buffer or (n < spec.shard_positions and not force):
            return
        index = len(manifest["shards"])
        tensors = _shuffled(buffer, spec, index)
        name = f"shard-{index:05d}.safetensors"
        tmp = out / (name + ".partial")
        save_file(tensors, tmp, metadata={"ppsd_teacher": json.dumps({"key": key, "index": index})})
        tmp.replace(out / name)
        counts = {}
        for w in buffer:
            s = spec.sources[w.source]
            counts[s] = counts.get(s, 0) + len(w.ids)
            manifest["done"][s].append(w.chunk)
            manifest["sources"][s]["chunks"] += 1
            manifest["sources"][s]["positions"] += len(w.ids)
        manifest["shards"].append({"file": name, "positions": n, "sources": counts})
        manifest["positions"] += n
        manifest["forwards"] += teacher.forwards if teacher else 0
        if teacher:
            teacher.forwards = 0
        manifest["wall_s"] = round(wall0 + time.perf_counter() - t0, 2)
        _write_manifest(out, manifest)
        buffer = []
        written += 1

    def run_pending():
        nonlocal teacher, new_positions
        if not pending:
            return
        if teacher is None:
            teacher = Teacher(model_dir, spec.exit_layers, spec.topk)
        for c, d in teacher.run(pending):
            seq = torch.tensor(c.ids, dtype=torch.int32)
            sl = slice(c.start, len(c.ids) - 1)
            buffer.append(_Work(src_index[c.source], c.index, d["hidden"], seq[sl], seq[sl.start + 1: sl.stop + 1],
                                torch.arange(sl.start, sl.stop, dtype=torch.int32), d["topk_ids"], d["topk_probs"]))
            new_positions += len(c.ids) - 1 - c.start
            bar.update(len(c.ids) - 1 - c.start)
        pending.clear()

    live = list(streams) + ([ANSWERS] if records else [])
    try:
        while planned < spec.positions and live:
            for s in list(live):  # round robin: one chunk of each source in turn
                if planned >= spec.positions:
                    break
                if s == ANSWERS:
                    item = next(answer_stream, None)
                    if item is None:
                        live.remove(s)
                        continue
                    n, seq, sl, d = item
                    planned += sl.stop - sl.start
                    if n in done[s]:
                        continue
                    seq = seq.to(torch.int32)
                    buffer.append(_Work(src_index[s], n, d["hidden"], seq[sl], seq[sl.start + 1: sl.stop + 1],
                                        torch.arange(sl.start, sl.stop, dtype=torch.int32), d["topk_ids"],
                                        d["topk_probs"]))
                    new_positions += sl.stop - sl.start
                    bar.update(sl.stop - sl.start)
                    continue
                c = next(streams[s], None)
                if c is None:
                    live.remove(s)
                    continue
                planned += len(c.ids) - 1 - c.start
                if c.index in done[s]:
                    continue
                pending.append(c)
                if len(pending) >= batch_size:
                    run_pending()
                    flush()
                    if stop_after_shards is not None and written >= stop_after_shards:
                        return manifest
        run_pending()
        flush(force=True)
    finally:
        bar.close()
    manifest["complete"] = planned >= spec.positions or not live
    manifest["planned_positions"] = planned
    manifest["run"] = {"new_positions": new_positions, "wall_s": round(time.perf_counter() - t0, 2),
                       "positions_per_hour": round(new_positions / max(1e-9, time.perf_counter() - t0) * 3600)}
    _write_manifest(out, manifest)
    return manifest


def _load_all_layers(path: Path, spec: TeacherSpec) -> list[dict]:
    """distill's records with every exit layer of the spec (load_dataset gives one at a time)."""
    first = load_dataset(path, spec.exit_layers[0], spec.answers)
    for e in spec.exit_layers:
        layer = first if e == spec.exit_layers[0] else load_dataset(path, e, spec.answers)
        for r, x in zip(first, layer):
            r[f"exit{e}"] = x["exit"]
    return first


def _shuffled(buffer: list[_Work], spec: TeacherSpec, index: int) -> dict[str, torch.Tensor]:
    cat = {
        **{k: torch.cat([w.hidden[k] for w in buffer]) for k in buffer[0].hidden},
        "topk_ids": torch.cat([w.topk_ids for w in buffer]),
        "topk_probs": torch.cat([w.topk_probs for w in buffer]),
        "ids": torch.cat([w.ids for w in buffer]),
        "next_ids": torch.cat([w.next_ids for w in buffer]),
        "pos": torch.cat([w.pos for w in buffer]),
        "chunk": torch.cat([torch.full((len(w.ids),), w.chunk, dtype=torch.int64) for w in buffer]),
        "source": torch.cat([torch.full((len(w.ids),), w.source, dtype=torch.int8) for w in buffer]),
    }
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + index)
    perm = torch.randperm(len(cat["ids"]), generator=g)
    return {k: v[perm].contiguous() for k, v in cat.items()}


def _read_manifest(out: Path) -> dict | None:
    path = out / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / "manifest.json.partial"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / "manifest.json")


# ---------------------------------------------------------------------------
# Command line: `ppsd distill-data` and jobs/distill_data.py share these


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--exit-layers", default="15", help="comma-separated exit layers whose hidden states are kept")
    p.add_argument("--sources", default="stdlib,docs,man,readmes,answers",
                   help=f"comma-separated: {', '.join(corpus.TEXT_SOURCES)}, answers, text:PATH")
    p.add_argument("--positions", type=int, default=1_000_000,
                   help="target training positions over all sources (round robin, chunk by chunk); a re-run "
                        "with a larger target continues")
    p.add_argument("--chunk-tokens", type=int, default=512, help="text tokens per chunk (its positions)")
    p.add_argument("--plain", action="store_true", help="text as plain text, not wrapped as a chat answer")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--shard-positions", type=int, default=65536, help="positions a shard holds (at least)")
    p.add_argument("--batch", type=int, default=4, help="chunks per forward")
    p.add_argument("--answers-prompts", type=Path, nargs="+", default=[DATA / "heads_train.jsonl"])
    p.add_argument("--answers", type=int, default=2, help="answers per prompt: the first greedy, the rest sampled")
    p.add_argument("--answers-max-new-tokens", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="Ray generation actors for the answers (0: in-process)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="default: ~/.cache/ppsd-ray/teacher/<model>-<key>")
    p.add_argument("--no-progress", action="store_true")


def spec_from_args(args) -> TeacherSpec:
    try:
        layers = tuple(sorted({int(x) for x in args.exit_layers.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"exit-layers: not a comma-separated list of integers: {args.exit_layers}") from None
    return TeacherSpec(sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()), exit_layers=layers,
                       positions=args.positions, chunk_tokens=args.chunk_tokens, chat=not args.plain,
                       topk=args.topk, shard_positions=args.shard_positions, seed=args.seed,
                       answers_prompts=tuple(str(Path(p).resolve()) for p in args.answers_prompts),
                       answers=args.answers, answers_max_new_tokens=args.answers_max_new_tokens)


def run(args, model_dir: Path) -> dict:
    """Builds the data as the arguments say; returns a summary (also printed by the callers)."""
    spec = spec_from_args(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    m = build_teacher_forced(model_dir, spec, args.out, batch_size=args.batch, threads=args.threads,
                             workers=args.workers, progress=not args.no_progress)
    return {"out": str(args.out or default_out(model_dir, spec)), "positions": m["positions"],
            "shards": len(m["shards"]), "sources": m["sources"], "complete": m["complete"], **m["run"]}

