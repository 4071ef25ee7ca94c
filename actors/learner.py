"""HeadLearner: ppsd_ray.online.OnlineLearner in a process of its own, beside stage 1.

It pulls what stage 1 recorded (`take_samples`: committed sequences' exit hidden
states and next tokens, never prompt text), runs training rounds on its own thread at
the lowest CPU priority with `threads` torch threads and no Ray CPU reservation, and
installs each better version on stage 1 (`install_head`: a head file in the version
store, on stage 1's node). Both calls are Ray calls to the stage actor, so they work
the same whatever carries the tokens (direct or ray transport).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import ray
import torch

from ppsd_ray.config import LearnConfig
from ppsd_ray.online import OnlineLearner, RoundResult

POLL_S = 1.0  # how often it asks stage 1 for new positions when it has nothing to train on


@dataclass(frozen=True)
class LearnerStatus:
    version: int                 # the version stage 1 drafts new sequences with (as far as the learner knows)
    positions_seen: int          # committed positions received from stage 1
    rounds: int                  # training rounds run
    installed: list[int]         # the versions it installed, in order
    last_round: RoundResult | None
    priority: str                # how its threads were lowered: "SCHED_IDLE" or "nice 19"
    error: str | None = None     # the last failure of its loop (it goes on)


def lowest_priority() -> str:
    """Every thread of this process at the lowest CPU priority (threads started later inherit
    it): SCHED_IDLE where the OS has it, else nice 19. Returns which."""
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    try:
        for tid in tids:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        for tid in tids:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        return "nice 19"


@ray.remote(num_cpus=0)
class HeadLearner:
    def __init__(self, model_dir: str, exit_layer: int, head: str, version: int, learn: dict, stage):
        """head, version: what stage 1 drafts with now; stage: stage 1's actor."""
        self.stage = stage
        self.config = LearnConfig(**learn)
        self.priority = lowest_priority()
        self.learner = OnlineLearner(model_dir, exit_layer, head, version, self.config)
        self.installed: list[int] = []
        self.last_round: RoundResult | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="ppsd-learn").start()

    def _run(self) -> None:
        torch.set_num_threads(self.config.threads)  # on the thread that trains: OpenMP's setting is per thread
        while not self._stop.is_set():
            try:
                trained = self._step()
            except Exception as e:  # stage 1 restarting, a full disk: try again later
                self.error, trained = f"{type(e).__name__}: {e}", False
            if not trained:
                self._stop.wait(POLL_S)

    def _step(self) -> bool:
        """Takes stage 1's new positions, runs a round if there are enough; whether it trained."""
        samples = ray.get(self.stage.take_samples.remote())
        learner = self.learner
        if samples.head_version != learner.version and learner.version:  # stage 1 restarted with its first head
            ray.get(self.stage.install_head.remote(learner.version, str(learner.path())))
        for hidden, targets in zip(samples.hidden, samples.targets):
            learner.add(hidden, targets)
        result = learner.round()
        if result is None:
            return False
        self.last_round = result
        if result.installed is not None:
            ray.get(self.stage.install_head.remote(result.installed, str(learner.path())))
            self.installed.append(result.installed)
        return True

    def status(self) -> LearnerStatus:
        return LearnerStatus(self.learner.version, self.learner.buffer.seen, self.learner.rounds,
                             list(self.installed), self.last_round, self.priority, self.error)

    def stop(self) -> None:
        self._stop.set()
