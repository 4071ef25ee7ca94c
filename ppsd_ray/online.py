"""Drafts that learn online from a server's own traffic (docs/heads.md, "Learning online").

Stage 1 records the exit layer's hidden state at every position the model wrote and,
when a sequence is released, hands the committed ones over as (hidden state, next
token) pairs (ppsd_ray.stage: `take_samples`). Prompt text is never kept: only
hidden states (fp16) and the tokens the model itself committed.

`OnlineLearner` keeps those pairs in a bounded `TrafficBuffer` (every
1/holdout_fraction-th pair goes to a held-back ring of the most recent ones) and
holds the serving head's weights and a candidate copy. A `round` trains the
candidate with distill.train_head (cross-entropy on the committed token: distill's
top-k loss with that token as the teacher's only one), then scores both heads by
greedy agreement (the draft == the committed token) on the held-back pairs. A
candidate that beats the serving head by `margin` becomes the next version, saved in
the `HeadStore`; any other is reset to the serving head, so a worse head is never
installed. Linear heads only: an 'lm' head starts as a linear head at identity (the
same function), a 'layer' head is refused.

Versions never change what the pipeline outputs: verification is exact, and each
sequence drafts with the version it started with to the end (ppsd_ray.stage).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import LearnConfig, check_learnable
from .distill import TrainSpec, new_head, topk_loss, train_head
from .heads import ExitHead, load_exit_head, read_head_meta, save_head
from .model import model_fingerprint


class Ring:
    """The newest `capacity` (hidden state fp16 [H], target id) pairs."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.hidden: torch.Tensor | None = None  # allocated at the first pairs: H is theirs
        self.targets = torch.zeros(capacity, dtype=torch.long)
        self.size = self._next = 0

    def __len__(self) -> int:
        return self.size

    def add(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        hidden, targets = hidden[-self.capacity:], targets[-self.capacity:]
        if self.hidden is None:
            self.hidden = torch.zeros(self.capacity, hidden.shape[1], dtype=torch.float16)
        at = (self._next + torch.arange(len(targets))) % self.capacity
        self.hidden[at] = hidden.to(torch.float16)
        self.targets[at] = targets.long()
        self._next = (self._next + len(targets)) % self.capacity
        self.size = min(self.capacity, self.size + len(targets))

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n pairs drawn uniformly (with replacement): hidden fp32 [n, H], targets [n]."""
        at = torch.randint(self.size, (n,), generator=generator)
        return self.hidden[at].float(), self.targets[at]

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hidden[:self.size].float(), self.targets[:self.size]


class TrafficBuffer:
    """Pairs from the traffic: by a running count, every `holdout_every`-th to the held-back
    ring, the others to the training ring."""

    def __init__(self, config: LearnConfig):
        self.every = config.holdout_every
        self.train, self.holdout = Ring(config.buffer_positions), Ring(config.holdout_positions)
        self.seen = 0

    def add(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        held = (self.seen + torch.arange(len(targets))) % self.every == self.every - 1
        self.holdout.add(hidden[held], targets[held])
        self.train.add(hidden[~held], targets[~held])
        self.seen += len(targets)


class BufferData:
    """One round's training data for distill.train_head: `steps` batches drawn from the
    training ring; the loss is cross-entropy on the committed token (distill's top-k loss
    with it as the teacher's one token of probability 1)."""

    def __init__(self, ring: Ring, batch: int, steps: int, seed: int):
        self.ring, self.batch, self.seed = ring, batch, seed
        self.per_epoch, self.tokens, self.size = steps, batch * steps, len(ring)

    def loss(self, head: ExitHead, epoch: int, k: int):
        x, y = self.ring.sample(self.batch, torch.Generator().manual_seed(self.seed * 1_000_003 + k))
        return topk_loss(head, x, y[:, None], torch.ones(len(y), 1), bf16=False), len(y)


@torch.no_grad()
def agreement(head: ExitHead, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> float:
    """How often the head's greedy draft (within its draft vocabulary) is the target."""
    head.eval()
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
            check_learnable(read_head_meta(head)["head_type"], head)
            serving = load_exit_head(head, exit_layer, serving.norm, serving.lm_head, model_dir=self.model_dir)
        self.serving = serving.eval()
        frozen = {id(m): m for m in (serving.lm_head, serving.draft_lm_head)}  # shared, never copied
        self.candidate = copy.deepcopy(serving, memo=frozen)
        self.store = HeadStore(config.store, self.model_dir, exit_layer)
        self.buffer = TrafficBuffer(config)
        self.rounds = 0
        self._trained = 0  # positions trained on so far (a position trained twice counts twice)

    def add(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
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
        spec = TrainSpec(head_type="linear", epochs=1, lr=cfg.lr, warmup=0, ckpt_every=cfg.steps_per_round,
                         seed=self.rounds, bf16=False)
        data = BufferData(self.buffer.train, cfg.batch_positions, cfg.steps_per_round, self.rounds)
        train_head(self.candidate, data, spec, progress=False, log=lambda *_: None)
        hidden, targets = self.buffer.holdout.pairs()
        cand, serv = agreement(self.candidate, hidden, targets), agreement(self.serving, hidden, targets)
        installed = None
        if cand >= serv + cfg.margin:
            installed = self.store.add(self.candidate, {
                "model_fingerprint": model_fingerprint(self.model_dir), "parent_version": self.version,
                "holdout_greedy_acceptance": round(cand, 4), "parent_holdout_greedy_acceptance": round(serv, 4),
                "holdout_positions": len(targets), "positions_seen": self.buffer.seen,
                "training_tokens": data.tokens, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.serving.load_state_dict(self.candidate.trainable_state(), strict=False)
            self.version = installed
        else:  # a worse head is never installed: start again from the serving one
            self.candidate.load_state_dict(self.serving.trainable_state(), strict=False)
        return RoundResult(cfg.steps_per_round, cand, serv, len(targets), installed)

    def path(self) -> Path | None:
        """The serving version's head file (None: version 0, the head the pipeline was given)."""
        return self.store.path(self.version) if self.version else None
