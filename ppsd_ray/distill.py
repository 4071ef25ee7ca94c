"""Self-distillation of exit heads: data from the model's own outputs, training, acceptance.

1. Data (`build_dataset`): the model answers each prompt with transformers' own
   `generate` (once greedy, then `answers - 1` times sampled), batched with left
   padding, in parallel over Ray actors. Forward hooks record, at every position
   the model ran, the exit layers' hidden states and the final (normed) hidden
   state. Full-vocabulary distributions are not stored (49152 floats a token);
   the teacher's logits are recomputed from the final hidden state with the
   frozen LM head. One shard file per batch under the cache directory: a re-run
   skips the shards already written.
2. Training (`train_head`): KL(teacher || head) over the full vocabulary,
   temperature 1, on the response positions; the base model frozen. A
   checkpoint after every `ckpt_every` steps and at every epoch's end; a re-run
   of the same command continues from it.
3. Acceptance (`acceptance`): along the model's own greedy output, how often the
   head's argmax is the model's next token (greedy) or among its top 2.

`train_head` runs one loop over either kind of data: `SequenceData` (the records
above: whole sequences, full-vocabulary KL) or `TopkData` (the data job's shards,
ppsd_ray/teacher.py: single shuffled positions with the teacher's top-k, `topk_loss`).

Position t of a record holds the hidden states of input token t; it predicts
token t + 1. Records keep the prompt's positions too (a 'layer' head attends
over them), the loss and acceptance count only positions >= prompt_len - 1.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .cluster import start_ray
from .families import build_shard, decoder, layer_prefix, load_tensors, tensor_names
from .heads import ExitHead, build_head
from .model import cache_dir, encode_prompt, model_fingerprint
from .prompts import read_prompts


# ---------------------------------------------------------------------------
# Data


@dataclass
class DataSpec:
    """Everything that determines a dataset; its hash names the cache directory.

    Each prompt gets `answers` answers: answer 0 greedy, answers 1.. sampled (each its
    own seed). Shards are per answer, so `answers` is not part of the key: a dataset
    with more answers reuses the shards of one with fewer."""
    prompts_file: str
    exit_layers: tuple[int, ...]
    max_prompts: int | None = None
    max_new_tokens: int = 96
    answers: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 16
    seed: int = 0

    def key(self, model_dir: Path) -> str:
        prompts = Path(self.prompts_file).read_bytes()
        spec = {k: v for k, v in asdict(self).items() if k != "answers"}
        blob = json.dumps({**spec, "prompts_file": hashlib.sha256(prompts).hexdigest(),
                           "model": model_fingerprint(model_dir), "v": 2}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


VAL_DATA_LAYERS = (8, 10, 15)  # what jobs/train_exit_head.py records by default: one cached set serves all


def validation_spec(prompts_file: Path | str, num_layers: int, exit_layer: int | None = None,
                    max_new_tokens: int = 64) -> DataSpec:
    """The validation data: greedy answers, with the hidden states of the default data
    layers the model has (and `exit_layer`); the same cache the training job writes."""
    layers = {e for e in VAL_DATA_LAYERS if e < num_layers} | ({exit_layer} if exit_layer else set())
    return DataSpec(prompts_file=str(prompts_file), exit_layers=tuple(sorted(layers)), max_new_tokens=max_new_tokens)


def plan_batches(tokenizer, spec: DataSpec) -> list[dict]:
    """Prompts -> batches of similar length (less padding), answer by answer; fixed by the spec."""
    prompts = read_prompts(spec.prompts_file)[:spec.max_prompts]
    items = sorted((len(ids), i, ids) for i, p in enumerate(prompts) for ids in [encode_prompt(tokenizer, p.prompt)])
    batches = []
    for answer in range(spec.answers):
        for j in range(0, len(items), spec.batch_size):
            chunk = items[j: j + spec.batch_size]
            batches.append({"name": _shard_name(answer, j // spec.batch_size), "sample": answer > 0,
                            "prompt_index": [x[1] for x in chunk], "ids": [x[2] for x in chunk],
                            "seed": spec.seed * 100003 + answer * 1009 + j // spec.batch_size})
    return batches


class Generator:
    """The full model (transformers' own class) answering batches; hooks record hidden states."""

    def __init__(self, model_dir: str, exit_layers: tuple[int, ...], threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.model.config.eos_token_id
        if isinstance(self.pad, list):
            self.pad = self.pad[0]
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else eos or [])
        self.exit_layers = tuple(exit_layers)

    @torch.inference_mode()
    def run(self, batch: dict, max_new_tokens: int, temperature: float, top_p: float) -> list[dict]:
        ids = batch["ids"]
        width = max(map(len, ids))
        inp = torch.full((len(ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding
            inp[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        taken: dict[str, list] = {f"exit{e}": [] for e in self.exit_layers}
        taken["final"] = []
        body = decoder(self.model)
        hooks = [body.layers[e - 1].register_forward_hook(recorder(taken[f"exit{e}"])) for e in self.exit_layers]
        hooks.append(body.norm.register_forward_hook(recorder(taken["final"])))
        torch.manual_seed(batch["seed"])
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if batch["sample"] else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            out = self.model.generate(inp, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      pad_token_id=self.pad, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        states = {k: torch.cat(v, dim=1) for k, v in taken.items()}  # [B, width + steps - 1, H]
        records = []
        for i, x in enumerate(ids):
            new = out[i, width:].tolist()
            n = len(new)
            for j, t in enumerate(new):
                if t in self.eos:
                    n = j + 1
                    break
            start, stop = width - len(x), width + n - 1  # positions run: every token but the last
            seq = list(x) + new[:n]
            rec = {"ids": torch.tensor(seq, dtype=torch.long), "prompt_len": len(x),
                   "prompt_index": batch["prompt_index"][i], "sampled": batch["sample"]}
            for k, v in states.items():
                h = v[i, start:stop]
                rec[k] = h.to(torch.float16) if k == "final" else h.clone()
            records.append(rec)
        return records


def recorder(store: list):
    def hook(module, args, output):
        store.append((output[0] if isinstance(output, tuple) else output).detach())
    return hook


def dataset_dir(model_dir: Path, spec: DataSpec) -> Path:
    name = Path(spec.prompts_file).stem
    return cache_dir() / "distill" / f"{name}-{spec.key(model_dir)}"


def build_dataset(model_dir: Path, spec: DataSpec, workers: int = 2, threads_per_worker: int = 1,
                  progress: bool = True) -> Path:
    """Writes (or completes) the dataset's shards; returns its directory. workers=0: in-process."""
    batches = plan_batches(AutoTokenizer.from_pretrained(model_dir), spec)  # a bad prompts file fails here
    out = dataset_dir(model_dir, spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps({**asdict(spec), "model_dir": str(model_dir)}, indent=1))
    todo = [b for b in batches if not (out / b["name"]).exists()]
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), desc=f"generate {out.name}",
               unit="batch", disable=not progress)
    args = (spec.max_new_tokens, spec.temperature, spec.top_p)
    tokens = 0

    def save(b, records):
        nonlocal tokens
        path = out / b["name"]
        torch.save(records, path.with_suffix(".partial"))
        path.with_suffix(".partial").replace(path)
        tokens += sum(len(r["ids"]) - r["prompt_len"] for r in records)
        bar.update(1)
        bar.set_postfix(new_tokens=tokens)

    if todo and workers == 0:
        gen = Generator(str(model_dir), spec.exit_layers, threads_per_worker)
        for b in todo:
            save(b, gen.run(b, *args))
    elif todo:
        import ray  # only with generation workers: `ppsd eval-acceptance --workers 0` runs without Ray

        start_ray(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(workers, 1)}))
        Remote = ray.remote(num_cpus=threads_per_worker)(Generator)
        actors = [Remote.remote(str(model_dir), spec.exit_layers, threads_per_worker) for _ in range(workers)]
        try:
            queue, running = list(todo), {}
            for a in actors:  # each actor has one batch running and the next one queued
                for _ in range(2):
                    if queue:
                        b = queue.pop(0)
                        running[a.run.remote(b, *args)] = (a, b)
            while running:
                [ref], _ = ray.wait(list(running), num_returns=1)
                a, b = running.pop(ref)
                save(b, ray.get(ref))
                if queue:
                    nb = queue.pop(0)
                    running[a.run.remote(nb, *args)] = (a, nb)
        finally:
            for a in actors:
                ray.kill(a)
    bar.close()
    return out


def _shard_name(answer: int, batch: int) -> str:
    return f"shard-a{answer}-{batch:04d}.pt"


def load_dataset(path: Path, exit_layer: int | None, answers: int | None = None) -> list[dict]:
    """Records with 'exit' (the given exit layer; None: no hidden states, 'exit' None), 'final',
    'ids', 'prompt_len', 'sampled', answer by answer; with `answers`, only the first that many
    answers to each prompt."""
    def answer(shard: Path) -> int:  # shard-a{answer}-{batch}.pt
        return int(shard.stem.split("-")[1][1:])

    records = []
    shards = sorted(Path(path).glob("shard-a*.pt"), key=lambda p: (answer(p), p.name))
    for shard in shards:
        if answers is not None and answer(shard) >= answers:
            continue
        for r in torch.load(shard, weights_only=True):
            key = f"exit{exit_layer}"
            if exit_layer is not None and key not in r:
                raise ValueError(f"exit_layer: dataset {path} has no hidden states for layer {exit_layer}")
            records.append({"exit": r.get(key), "final": r["final"], "ids": r["ids"],
                            "prompt_len": r["prompt_len"], "sampled": r["sampled"]})
    return records


# ---------------------------------------------------------------------------
# Heads on top of the frozen model's tensors


def frozen_parts(model_dir: Path):
    """The model's final norm and LM head (frozen; the family's own classes), and its config."""
    parts = build_shard(Path(model_dir), 0, 0, embed=False, head=True)
    for p in [*parts.final_norm.parameters(), *parts.lm_head.parameters()]:
        p.requires_grad = False
    return parts.final_norm, parts.lm_head, AutoConfig.from_pretrained(model_dir)


def new_head(kind: str, model_dir: Path, exit_layer: int) -> ExitHead:
    """An untrained head; a 'layer' head starts as a copy of layer `exit_layer` (the first
    layer the exit skips), its norm as the model's final norm."""
    norm, lm_head, config = frozen_parts(model_dir)
    head = build_head(kind, exit_layer, norm, lm_head, config)
    if kind == "layer":
        prefix = layer_prefix(model_dir, exit_layer)
        src = {n: n[len(prefix):] for n in _names(model_dir) if n.startswith(prefix)}
        state = {"body.layers.0." + v: w.float() for k, v in src.items()
                 for w in [load_tensors(Path(model_dir), [k])[k]]}
        state.update({"body.norm." + k: v.detach().clone() for k, v in norm.state_dict().items()})
        head.load_state_dict(state, strict=False)
        head.body.rotary_emb = type(head.body.rotary_emb)(config=head.config)
    for p in head.parameters():
        p.requires_grad = True
    head.lm_head.weight.requires_grad = False
    return head


def _names(model_dir: Path) -> list[str]:
    return tensor_names(Path(model_dir))


# ---------------------------------------------------------------------------
# Training


@dataclass
class TrainSpec:
    head_type: str = "linear"
    epochs: int = 4
    lr: float | None = None        # default by head type
    batch_seqs: int = 4
    weight_decay: float = 0.0
    warmup: int = 20
    ckpt_every: int = 50
    seed: int = 0
    bf16: bool = True              # logits in bfloat16 autocast (CPU AMX/AVX512-bf16: ~4x faster)
    max_records: int | None = None
    prompt_positions: bool = False  # the loss also counts the prompt's positions (more data, other text)

    def lr_or_default(self) -> float:
        return self.lr if self.lr is not None else {"linear": 1e-2, "layer": 2e-3}.get(self.head_type, 1e-3)


def _batches(records: list[dict], size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(len(records)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i: i + size] for i in range(0, len(order), size)]


def _collate(records: list[dict], idx: list[int], prompt_positions: bool = False):
    """Right-padded batch: exit [B, T, H], final [B, T, H], loss mask [B, T], attention mask."""
    rs = [records[i] for i in idx]
    t = max(r["exit"].shape[0] for r in rs)
    h = rs[0]["exit"].shape[1]
    x = torch.zeros(len(rs), t, h)
    y = torch.zeros(len(rs), t, h)
    att = torch.zeros(len(rs), t, dtype=torch.long)
    loss = torch.zeros(len(rs), t, dtype=torch.bool)
    nxt = torch.zeros(len(rs), t, dtype=torch.long)
    for i, r in enumerate(rs):
        n = r["exit"].shape[0]
        x[i, :n] = r["exit"].float()
        y[i, :n] = r["final"].float()
        att[i, :n] = 1
        loss[i, 0 if prompt_positions else r["prompt_len"] - 1: n] = True
        nxt[i, :n] = r["ids"][1: n + 1]
    return x, y, att, loss, nxt


def head_features(head: ExitHead, x, att):
    if head.needs_cache:  # sequences: causal attention over the batch's own positions
        pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        return head.features(x, position_ids=pos, attention_mask=att)
    return head.features(x)


def kl_loss(head: ExitHead, x, y, att, mask, bf16: bool = True):
    """KL(teacher || head), full vocabulary, temperature 1, mean over the masked positions."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else _nullctx()
    with ctx:
        feats = head_features(head, x, att)[mask]
        student = head.logits(feats)
        with torch.no_grad():
            teacher = head.lm_head(y[mask])
    log_q = F.log_softmax(student.float(), dim=-1)
    log_p = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / max(1, mask.sum().item())


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class SequenceData:
    """Training data as whole sequences (distill's own records): batches of `batch_seqs`
    sequences, the loss KL(teacher || head) over the full vocabulary, the teacher's logits
    recomputed from the recorded final hidden state."""

    def __init__(self, records: list[dict], spec: TrainSpec):
        self.records = records[: spec.max_records] if spec.max_records else records
        self.spec = spec
        self.per_epoch = math.ceil(len(self.records) / spec.batch_seqs)
        self.size = len(self.records)  # what a checkpoint is checked against
        self.tokens = training_tokens(self.records, spec.prompt_positions)

    def loss(self, head: ExitHead, epoch: int, k: int):
        """(loss, positions) of batch k of an epoch."""
        idx = _batches(self.records, self.spec.batch_seqs, self.spec.seed, epoch)[k]
        x, y, att, mask, _ = _collate(self.records, idx, self.spec.prompt_positions)
        return kl_loss(head, x, y, att, mask, self.spec.bf16), int(mask.sum())


class TopkData:
    """Training data as single positions: the data job's shards (ppsd_ray/teacher.py), each
    position the exit layer's hidden state and the teacher's top-k ids and probabilities. An
    epoch visits the shards in a seeded order, each shard's positions in a seeded order, in
    batches of `batch_positions` that never cross a shard (so a step maps to one shard and a
    resumed training takes the same batches); one shard in memory at a time. The positions are
    shuffled single positions: a head that attends over past positions ('layer') cannot use them."""

    def __init__(self, dirs: list[Path] | Path, exit_layer: int, batch_positions: int = 512, seed: int = 0,
                 bf16: bool = True, max_positions: int | None = None):
        dirs = [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]
        self.shards: list[tuple[Path, int]] = []
        for d in dirs:
            manifest = read_topk_manifest(d)
            if exit_layer not in manifest["spec"]["exit_layers"]:
                raise ValueError(f"exit_layer: data {d} has no hidden states for layer {exit_layer} "
                                 f"(it has {manifest['spec']['exit_layers']})")
            self.shards += [(d / s["file"], s["positions"]) for s in manifest["shards"]]
        if max_positions is not None:  # whole shards, in the order written, up to about max_positions
            kept, n = [], 0
            for path, m in self.shards:
                if n >= max_positions:
                    break
                kept.append((path, m))
                n += m
            self.shards = kept
        if not self.shards:
            raise ValueError(f"data: no shards in {', '.join(map(str, dirs))}")
        self.key = f"exit{exit_layer}"
        self.batch, self.seed, self.bf16 = batch_positions, seed, bf16
        self.tokens = sum(n for _, n in self.shards)
        self.per_epoch = sum(math.ceil(n / batch_positions) for _, n in self.shards)
        self.size = f"{self.tokens} positions in {len(self.shards)} shards, batches of {batch_positions}"
        self._loaded: tuple[Path, dict] | None = None

    def _plan(self, epoch: int) -> list[tuple[int, int]]:
        """(shard, batch within it) for every step of an epoch."""
        order = list(range(len(self.shards)))
        random.Random(self.seed * 1000 + epoch).shuffle(order)
        return [(i, b) for i in order for b in range(math.ceil(self.shards[i][1] / self.batch))]

    def _shard(self, i: int) -> dict:
        path = self.shards[i][0]
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = (path, load_file(path))
        return self._loaded[1]

    def batch_at(self, epoch: int, k: int):
        """hidden [B, H] fp32, top-k ids [B, k] int64, top-k probabilities [B, k] fp32."""
        i, b = self._plan(epoch)[k]
        shard = self._shard(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 10_007 + i)
        sel = torch.randperm(self.shards[i][1], generator=g)[b * self.batch: (b + 1) * self.batch]
        return shard[self.key][sel].float(), shard["topk_ids"][sel].long(), shard["topk_probs"][sel].float()

    def loss(self, head: ExitHead, epoch: int, k: int):
        if head.needs_cache:
            raise ValueError(f"head: a '{head.kind}' head attends over past positions; top-k shards hold shuffled "
                             "single positions (train a 'linear' head on them)")
        x, ids, probs = self.batch_at(epoch, k)
        return topk_loss(head, x, ids, probs, self.bf16), x.shape[0]


def read_topk_manifest(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "manifest.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"data: {path} has no manifest.json; not a directory the data job wrote") from None


def topk_loss(head: ExitHead, x, ids, probs, bf16: bool = True):
    """KL between the teacher and the head over the partition {each of the teacher's top-k
    tokens, all the other tokens}: the stored top-k probabilities as they are, the rest of the
    teacher's mass (1 - their sum) against the head's mass outside those k tokens. It is the
    full-vocabulary KL when the teacher's top-k hold all its mass, a lower bound of it otherwise.
    Mean over positions. x [B, H] at the exit layer; ids, probs [B, k]."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else _nullctx()
    with ctx:
        student = head.logits(head.features(x[:, None])[:, 0])
    log_q = F.log_softmax(student.float(), dim=-1)
    log_q_top = log_q.gather(-1, ids)
    p = probs.clamp_min(0)
    rest_p = (1 - p.sum(-1)).clamp_min(0)
    top_mass = torch.logsumexp(log_q_top, dim=-1).clamp_max(-1e-6)
    log_q_rest = torch.log(-torch.expm1(top_mass))  # log(1 - sum of the head's top-k mass)
    kl = (torch.xlogy(p, p) - p * log_q_top).sum(-1) + torch.xlogy(rest_p, rest_p) - rest_p * log_q_rest
    return kl.mean()


def train_head(head: ExitHead, data, spec: TrainSpec, ckpt: Path | None = None,
               progress: bool = True, log=print, on_epoch=None) -> dict:
    """Trains `head` in place; resumes from `ckpt` if it exists. Returns training stats.
    data: records (a list: SequenceData) or a SequenceData / TopkData. on_epoch(epoch) -> dict,
    called after each epoch; its answers are kept as 'history'."""
    if isinstance(data, list):
        data = SequenceData(data, spec)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr_or_default(), weight_decay=spec.weight_decay)
    per_epoch = data.per_epoch
    total = per_epoch * spec.epochs

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - spec.warmup) / max(1, total - spec.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    step, losses, wall, history = 0, [], 0.0, []
    if ckpt is not None and Path(ckpt).exists():
        state = torch.load(ckpt, weights_only=False)
        if state["spec"] != asdict(spec) or state["records"] != data.size:
            raise ValueError(f"checkpoint {ckpt} was written for other settings; delete it to start over")
        head.load_state_dict(state["head"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, losses, wall, history = state["step"], state["losses"], state["wall_s"], state["history"]
        log(f"resuming from {ckpt} at step {step}/{total}")

    def save_ckpt():
        if ckpt is None:
            return
        tmp = Path(ckpt).with_suffix(".partial")
        torch.save({"spec": asdict(spec), "records": data.size, "head": head.trainable_state(),
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                    "losses": losses, "wall_s": wall, "history": history}, tmp)
        tmp.replace(ckpt)

    head.train()
    bar = tqdm(total=total, initial=step, desc=f"train {head.kind}@{head.exit_layer}", unit="step",
               disable=not progress)
    while step < total:
        epoch, k = divmod(step, per_epoch)
        t0 = time.perf_counter()
        loss, _ = data.loss(head, epoch, k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        wall += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(epoch=epoch, kl=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if step % per_epoch == 0 and on_epoch is not None:
            history.append({"epoch": step // per_epoch, "kl": sum(losses[-per_epoch:]) / per_epoch,
                            **on_epoch(step // per_epoch)})
            head.train()
        if step % spec.ckpt_every == 0 or step % per_epoch == 0 or step == total:
            save_ckpt()
    bar.close()
    head.eval()
    return {"steps": total, "epochs": spec.epochs, "train_wall_s": round(wall, 1),
            "final_kl": sum(losses[-per_epoch:]) / max(1, len(losses[-per_epoch:])), "history": history,
            "training_tokens": data.tokens, "losses": losses}


def training_tokens(records: list[dict], prompt_positions: bool = False) -> int:
    """Positions the loss counts (one per predicted token)."""
    return sum(r["exit"].shape[0] - (0 if prompt_positions else r["prompt_len"] - 1) for r in records)


# ---------------------------------------------------------------------------
# Acceptance


@torch.no_grad()
def acceptance(head: ExitHead, records: list[dict], batch_seqs: int = 16) -> dict:
    """Along the model's own greedy output: the head's argmax == the model's next token
    (greedy), the model's next token in the head's top 2 (top2); both as drafts are made,
    within the head's draft vocabulary if it has one. fp32, no autocast."""
    head.eval()
    hit1 = hit2 = n = 0
    for i in range(0, len(records), batch_seqs):
        idx = list(range(i, min(i + batch_seqs, len(records))))
        x, _, att, mask, nxt = _collate(records, idx)
        logits, ids = head.draft_logits(head_features(head, x, att)[mask])
        top2 = logits.topk(2, dim=-1).indices
        if ids is not None:
            top2 = ids[top2]
        target = nxt[mask]
        hit1 += int((top2[:, 0] == target).sum())
        hit2 += int((top2 == target[:, None]).any(-1).sum())
        n += int(mask.sum())
    return {"greedy": hit1 / max(1, n), "top2": hit2 / max(1, n), "tokens": n}


@torch.no_grad()
def topk_agreement(head: ExitHead, data: TopkData, max_positions: int = 4096) -> dict:
    """On top-k shards: how often the head's argmax is the teacher's top-1 (greedy) or in the
    head's top 2 (top2), over up to max_positions positions of the first epoch's order."""
    head.eval()
    hit1 = hit2 = n = 0
    for k in range(data.per_epoch):
        if n >= max_positions:
            break
        x, ids, _ = data.batch_at(0, k)
        logits, vocab_ids = head.draft_logits(head.features(x[:, None])[:, 0])
        top2 = logits.topk(2, dim=-1).indices
        if vocab_ids is not None:
            top2 = vocab_ids[top2]
        hit1 += int((top2[:, 0] == ids[:, 0]).sum())
        hit2 += int((top2 == ids[:, :1]).any(-1).sum())
        n += x.shape[0]
    return {"greedy": hit1 / max(1, n), "top2": hit2 / max(1, n), "tokens": n}
