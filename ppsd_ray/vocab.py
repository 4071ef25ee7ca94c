"""Draft vocabularies: the only tokens a head may propose, built from the model's own answers.

`build_vocab`: the model answers a sample of the head-training prompts (every
`every`-th line of each file; ppsd_ray.distill's generation and cache). Its answer
tokens, most frequent first, are taken until they cover `coverage` of all answer
tokens; then, with `size`, the lowest token ids not yet taken fill it up to `size`
ids (a BPE tokenizer's ids follow its merge order, a proxy for frequency in its
own training corpus). The result is sorted.

A vocabulary file is a .safetensors with one int64 tensor `draft_vocab` and the
header metadata key "ppsd_draft_vocab" (JSON): model_fingerprint, size, coverage
on the sample's and on the validation set's answers, the build settings and the
command. `attach_vocab` writes it into a head file (heads.py stores it there) and
re-measures the head's validation acceptance with it.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import distill
from .heads import HeadMismatch, VOCAB_KEY, check_draft_vocab, load_exit_head, read_head_meta, save_head
from .model import cache_dir, model_fingerprint

META_KEY = "ppsd_draft_vocab"


@dataclass
class VocabSpec:
    prompts_files: tuple[str, ...]
    every: int = 6               # every n-th prompt of each file
    answers: int = 1             # per prompt: the first greedy, the rest sampled
    max_new_tokens: int = 128
    coverage: float = 0.99       # of the sample's answer tokens
    size: int | None = None      # fill up to this many ids with the lowest ones
    batch_size: int = 64


def sample_prompts(files: tuple[str, ...], every: int) -> Path:
    """Every `every`-th prompt of each file, in one file under the cache (named by its content)."""
    lines = [line for f in files for line in Path(f).read_text().splitlines()[::every] if line.strip()]
    text = "".join(line + "\n" for line in lines)
    out = cache_dir() / "draft-vocab" / f"prompts-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def answer_tokens(records: list[dict]) -> list[int]:
    """The distillation targets: every answer token (a prompt's tokens are never predicted)."""
    return [t for r in records for t in r["ids"][r["prompt_len"]:].tolist()]


def choose_vocab(counts: Counter, coverage: float, vocab_size: int, size: int | None = None) -> torch.Tensor:
    total = sum(counts.values())
    taken, covered = [], 0
    for token, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])):
        if covered >= coverage * total:
            break
        taken.append(token)
        covered += n
    if size is not None:
        if size < len(taken):
            raise ValueError(f"size: {size} ids cannot cover {coverage} of the answers ({len(taken)} needed)")
        have = set(taken)
        taken += [t for t in range(vocab_size) if t not in have][: size - len(taken)]
    return torch.tensor(sorted(taken), dtype=torch.int64)


def coverage_of(ids: torch.Tensor, tokens: list[int]) -> float:
    have = set(ids.tolist())
    return sum(t in have for t in tokens) / max(1, len(tokens))


def build_vocab(model_dir: Path, spec: VocabSpec, val_prompts: Path, command: str, workers: int = 2,
                progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The vocabulary and its metadata (coverage on the sample and on the validation answers)."""
    info = json.loads((Path(model_dir) / "config.json").read_text())
    data = distill.DataSpec(prompts_file=str(sample_prompts(spec.prompts_files, spec.every)), exit_layers=(),
                            max_new_tokens=spec.max_new_tokens, answers=spec.answers, batch_size=spec.batch_size)
    sample = answer_tokens(distill.load_dataset(distill.build_dataset(model_dir, data, workers, 1, progress), None))
    val_spec = distill.validation_spec(val_prompts, info["num_hidden_layers"])
    val = answer_tokens(distill.load_dataset(distill.build_dataset(model_dir, val_spec, workers, 1, progress), None))
    ids = choose_vocab(Counter(sample), spec.coverage, info["vocab_size"], spec.size)
    meta = {"model_fingerprint": model_fingerprint(model_dir), "size": len(ids),
            "sample_coverage": round(coverage_of(ids, sample), 4), "sample_tokens": len(sample),
            "sample_distinct": len(set(sample)), "val_coverage": round(coverage_of(ids, val), 4),
            "val_tokens": len(val), "val_prompts": Path(val_prompts).name,
            "spec": {**asdict(spec), "prompts_files": [Path(f).name for f in spec.prompts_files]},
            "command": command}
    return ids, meta


def save_vocab(path: Path, ids: torch.Tensor, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({VOCAB_KEY: ids.contiguous()}, path, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_vocab(path: Path, vocab_size: int) -> tuple[torch.Tensor, dict]:
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            ids = f.get_tensor(VOCAB_KEY)
    except Exception as e:  # not a vocabulary file
        raise HeadMismatch(f"vocab: {path} is not a draft vocabulary file ({e})") from None
    return check_draft_vocab(ids, vocab_size, f"vocab: {path}"), meta


def attach_vocab(head_path: Path, vocab_path: Path, model_dir: Path, val_records: list[dict], command: str,
                 out: Path | None = None) -> dict:
    """Writes the head with this vocabulary (to `out`, default in place); its metadata gets
    the vocabulary's, and the validation acceptance with it (the full-vocabulary numbers kept
    as full_vocab_*). Returns the new metadata."""
    meta = read_head_meta(head_path)
    norm, lm_head, config = distill.frozen_parts(model_dir)
    ids, vocab_meta = read_vocab(vocab_path, config.vocab_size)
    if vocab_meta.get("model_fingerprint") != meta.get("model_fingerprint"):
        raise HeadMismatch(f"vocab: {vocab_path} was built for model {vocab_meta.get('model_fingerprint')}, "
                           f"the head {head_path} for {meta.get('model_fingerprint')}")
    head = load_exit_head(str(head_path), meta["exit_layer"], norm, lm_head, model_dir=model_dir, config=config)
    head.set_draft_vocab(None)
    full = distill.acceptance(head, val_records)
    head.set_draft_vocab(ids)
    restricted = distill.acceptance(head, val_records)
    meta = {k: v for k, v in meta.items() if k != "draft_vocab"} | {
        "full_vocab_val_greedy_acceptance": round(full["greedy"], 4),
        "full_vocab_val_top2_acceptance": round(full["top2"], 4),
        "val_greedy_acceptance": round(restricted["greedy"], 4),
        "val_top2_acceptance": round(restricted["top2"], 4), "val_tokens": restricted["tokens"],
        "draft_vocab": vocab_meta, "attach_command": command}
    save_head(head, out or head_path, meta)
    return read_head_meta(out or head_path)
