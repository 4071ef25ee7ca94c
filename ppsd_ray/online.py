"""Drafts that learn online from a server's own traffic (docs/heads.md, "Learning online").

Stage 1 records the exit layer's hidden state at every position and, when a sequence
is released, hands over its committed positions with the token the model wrote next
as each one's target (ppsd_ray.stage: `take_samples`). Prompt text is never kept:
only hidden states (fp16) and the tokens the model itself committed; a head that
attends over past positions ('layer') gets the prompt's hidden states as its context.

`OnlineLearner` keeps those sequences in a bounded `TrafficBuffer` (every
1/holdout_fraction-th sequence goes to a held-back ring of the most recent ones) and
holds the serving head's weights and a candidate copy. A `round` trains the
candidate with distill.train_head (cross-entropy on the committed token), then
scores both heads by greedy agreement (the draft == the committed token) on the
held-back positions. A candidate that beats the serving head by `margin` becomes the
next version, saved in the `HeadStore`; any other is reset to the serving head, so a
worse head is never installed. An 'lm' head starts as a linear head at identity (the
same function); 'linear' and 'layer' heads go on from their weights.

Versions never change what the pipeline outputs: verification is exact, and each
sequence drafts with the version it started with to the end (ppsd_ray.stage).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import LearnConfig
from .distill import TrainSpec, head_features, new_head, train_head
from .heads import ExitHead, load_exit_head, read_head_meta, save_head
from .model import model_fingerprint


class Ring:
    """The newest sequences, at most `capacity` positions in all: each its exit hidden states
    fp16 [n, H] and targets [n] (-1: none). len() counts the targets."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.seqs: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self.rows = self.size = 0
        self._pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.size

    def add(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        hidden, targets = hidden[:self.capacity].to(torch.float16), targets[:self.capacity].long()
        self.seqs.append((hidden, targets))
        self.rows, self.size = self.rows + len(targets), self.size + int((targets >= 0).sum())
        while self.rows > self.capacity:
            _, old = self.seqs.popleft()
            self.rows, self.size = self.rows - len(old), self.size - int((old >= 0).sum())
        self._pairs = None

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position with a target: hidden fp32 [n, H], targets [n]."""
        if self._pairs is None:
            hidden = torch.cat([h[t >= 0] for h, t in self.seqs])
            targets = torch.cat([t[t >= 0] for _, t in self.seqs])
            self._pairs = hidden.float(), targets
        return self._pairs


class TrafficBuffer:
    """Sequences from the traffic: by a running count, every `holdout_every`-th to the held-back
    ring, the others to the training ring."""

    def __init__(self, config: LearnConfig):
        self.every = config.holdout_every
        self.train, self.holdout = Ring(config.buffer_positions), Ring(config.holdout_positions)
        self.seen = self._sequences = 0

    def add(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        self._sequences += 1
        (self.holdout if self._sequences % self.every == 0 else self.train).add(hidden, targets)
        self.seen += int((targets >= 0).sum())


def _sequence_batch(seqs: list[tuple[torch.Tensor, torch.Tensor]]):
    """Right-padded: hidden fp32 [B, T, H], attention mask [B, T], targets [B, T] (-1: none)."""
    t = max(len(y) for _, y in seqs)
    x = torch.zeros(len(seqs), t, seqs[0][0].shape[1])
    att = torch.zeros(len(seqs), t, dtype=torch.long)
    y = torch.full((len(seqs), t), -1, dtype=torch.long)
    for i, (h, targets) in enumerate(seqs):
        x[i, :len(targets)], att[i, :len(targets)], y[i, :len(targets)] = h.float(), 1, targets
    return x, att, y


class BufferData:
    """One round's training data for distill.train_head: `steps` batches of about `batch`
    positions drawn from the training ring (single positions; whole sequences for a head that
    attends), the loss cross-entropy on the committed token."""

    def __init__(self, ring: Ring, batch: int, steps: int, seed: int):
        self.ring, self.batch, self.seed = ring, batch, seed
        self.per_epoch, self.tokens, self.size = steps, batch * steps, len(ring)

    def loss(self, head: ExitHead, epoch: int, k: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        if head.needs_cache:
            seqs, n = [], 0
            while n < self.batch:
                h, t = self.ring.seqs[int(torch.randint(len(self.ring.seqs), (1,), generator=g))]
                seqs.append((h, t))
                n += int((t >= 0).sum())
            x, att, y = _sequence_batch(seqs)
        else:
            hidden, targets = self.ring.pairs()
            at = torch.randint(len(targets), (self.batch,), generator=g)
            x, att, y = hidden[at, None], torch.ones(self.batch, 1, dtype=torch.long), targets[at, None]
        feats = head_features(head, x, att)[y >= 0]
        return F.cross_entropy(head.logits(feats).float(), y[y >= 0]), len(feats)


@torch.no_grad()
def agreement(head: ExitHead, ring: Ring, chunk: int = 4096) -> float:
    """How often the head's greedy draft (within its draft vocabulary) is the target."""
    head.eval()
    if head.needs_cache:  # each sequence in one forward, its own causal attention
        hits = 0
        for h, t in ring.seqs:
            feats = head_features(head, h[None].float(), torch.ones(1, len(t), dtype=torch.long))[0]
            hits += int((head.draft_tokens(feats[t >= 0]) == t[t >= 0]).sum())
        return hits / max(1, len(ring))
    hidden, targets = ring.pairs()
    hits = sum(int((head.draft_tokens(head.features(hidden[i:i + chunk])) == targets[i:i + chunk]).sum())
               for i in range(0, len(targets), chunk))
    return hits / max(1, len(targets))


@dataclass(frozen=True)
class StoredVersion:
    version: int
    current: bool
    path: Path
    meta: dict


class HeadStore:
    """The learned versions of one model's exit head at one exit layer:
    <root>/<model fingerprint>/exit<E>/v0001.safetensors, ... (head files with their
    metadata) and current.json naming the version a pipeline that learns starts from
    (none: the head it is given, version 0)."""

    def __init__(self, root: Path | str, model_dir: Path, exit_layer: int):
        self.model_dir, self.exit_layer = Path(model_dir), exit_layer
        self.dir = Path(root).expanduser() / model_fingerprint(model_dir) / f"exit{exit_layer}"

    def versions(self) -> list[int]:
        return sorted(int(p.stem[1:]) for p in self.dir.glob("v[0-9]*.safetensors"))

    def path(self, version: int) -> Path:
        path = self.dir / f"v{version:04d}.safetensors"
        if not path.is_file():
            raise ValueError(f"version: no version {version} in {self.dir} (there are: "
                             f"{', '.join(map(str, self.versions())) or 'none'})")
        return path

    def current(self) -> int | None:
        index = self.dir / "current.json"
        return json.loads(index.read_text())["current"] if index.is_file() else None

    def add(self, head: ExitHead, meta: dict) -> int:
        """Saves the head as the next version and makes it current."""
        version = max(self.versions(), default=0) + 1
        save_head(head, self.dir / f"v{version:04d}.safetensors", {**meta, "version": version})
        self.restore(version)
        return version

    def restore(self, version: int) -> None:
        """Makes a stored version current: the next pipeline that learns starts from it."""
        self.path(version)
        tmp = self.dir / "current.json.partial"
        tmp.write_text(json.dumps({"current": version}))
        tmp.replace(self.dir / "current.json")

    def export(self, version: int, dest: Path | str) -> Path:
        """A copy of a version's head file: usable as `--head FILE` anywhere the model is."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"learned-exit{self.exit_layer}-v{version:04d}.safetensors"
        shutil.copyfile(self.path(version), dest)
        return dest

    def list(self) -> list[StoredVersion]:
        current = self.current()
        return [StoredVersion(v, v == current, self.path(v), read_head_meta(self.path(v))) for v in self.versions()]


def stored_exit_layers(root: Path | str, model_dir: Path) -> list[int]:
    """The exit layers a model has learned versions for."""
    base = Path(root).expanduser() / model_fingerprint(model_dir)
    return sorted(int(d.name[4:]) for d in base.glob("exit[0-9]*") if d.is_dir())


def starting_head(config: LearnConfig, model_dir: Path, exit_layer: int, head: str) -> tuple[str, int]:
    """(head spec, version) a pipeline that learns starts from: the store's current version,
    else `head` as version 0."""
    store = HeadStore(config.store, model_dir, exit_layer)
    current = store.current()
    return (str(store.path(current)), current) if current is not None else (head, 0)


@dataclass(frozen=True)
class RoundResult:
    """One round: the candidate's and the serving head's greedy agreement on the held-back
    positions, how many there were, and the version installed (None: the serving head stays)."""
    steps: int
    candidate_acceptance: float
    serving_acceptance: float
    holdout_positions: int
    installed: int | None


class OnlineLearner:
    """Trains a candidate copy of the serving head on the traffic buffer; a candidate that
    beats the serving head on the held-back positions by `margin` becomes a new version."""

    def __init__(self, model_dir: Path, exit_layer: int, head: str, version: int, config: LearnConfig):
        """head: the serving head ('lm' or a head file) and its version."""
        self.model_dir, self.config, self.version = Path(model_dir), config, version
        serving = new_head("linear", self.model_dir, exit_layer)  # at identity: the 'lm' head's function
        if head != "lm":
            serving = load_exit_head(head, exit_layer, serving.norm, serving.lm_head, model_dir=self.model_dir)
        self.serving = serving.eval()
        frozen = {id(m): m for m in (serving.lm_head, serving.draft_lm_head)}  # shared, never copied
        self.candidate = copy.deepcopy(serving, memo=frozen)
        self.store = HeadStore(config.store, self.model_dir, exit_layer)
        self.buffer = TrafficBuffer(config)
        self.rounds = 0
        self._trained = 0  # positions trained on so far (a position trained twice counts twice)

    def add(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        """One committed sequence: hidden states [n, H] and targets [n] (-1: none)."""
        self.buffer.add(hidden, targets)

    def ready(self) -> bool:
        """Enough pairs for a round: a training batch's worth and min_holdout held back, and the
        positions seen not yet trained on `passes` times each (no new traffic, no endless training)."""
        cfg = self.config
        return (self.buffer.seen >= cfg.batch_positions and len(self.buffer.holdout) >= cfg.min_holdout
                and self._trained < cfg.passes * self.buffer.seen)

    def round(self) -> RoundResult | None:
        """Trains the candidate steps_per_round steps and scores it; None when not ready."""
        if not self.ready():
            return None
        cfg = self.config
        self.rounds, self._trained = self.rounds + 1, self._trained + cfg.steps_per_round * cfg.batch_positions
        spec = TrainSpec(head_type=self.serving.kind, epochs=1, lr=cfg.lr, warmup=0,
                         ckpt_every=cfg.steps_per_round, seed=self.rounds, bf16=False)
        data = BufferData(self.buffer.train, cfg.batch_positions, cfg.steps_per_round, self.rounds)
        train_head(self.candidate, data, spec, progress=False, log=lambda *_: None)
        held = self.buffer.holdout
        cand, serv = agreement(self.candidate, held), agreement(self.serving, held)
        installed = None
        if cand >= serv + cfg.margin:
            installed = self.store.add(self.candidate, {
                "model_fingerprint": model_fingerprint(self.model_dir), "parent_version": self.version,
                "holdout_greedy_acceptance": round(cand, 4), "parent_holdout_greedy_acceptance": round(serv, 4),
                "holdout_positions": len(held), "positions_seen": self.buffer.seen,
                "training_tokens": data.tokens, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.serving.load_state_dict(self.candidate.trainable_state(), strict=False)
            self.version = installed
        else:  # a worse head is never installed: start again from the serving one
            self.candidate.load_state_dict(self.serving.trainable_state(), strict=False)
        return RoundResult(cfg.steps_per_round, cand, serv, len(held), installed)

    def path(self) -> Path | None:
        """The serving version's head file (None: version 0, the head the pipeline was given)."""
        return self.store.path(self.version) if self.version else None
