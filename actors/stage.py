"""StageActor: one ppsd_ray.stage.Stage in its own process (and GPU, when there is one).

transport "ray": forward and release run on the "compute" thread, one call at a
time, each an actor call with the previous stage's Hop as an object ref; rollback
runs on the "control" thread, so it takes effect while the calls it makes stale are
still queued behind the running one: they are then skipped, not computed.

Online learning: `take_samples` and `install_head` run on a "learn" thread; the
stage swaps a new head in under its lock, between steps, whichever transport runs them.

transport "direct": Ray only starts the process; `open_inbox`, `join_group` and
`start_loop` hand the Stage to a ppsd_ray.transport.StageLoop, and from then on
no actor call carries a token.
"""
from __future__ import annotations

import os

import ray
import torch

from ppsd_ray.kv import keep_freed_memory, on_passing_thread
from ppsd_ray.protocol import Samples, Work
from ppsd_ray.stage import Stage
from ppsd_ray.transport import StageLoop, TensorGroup, free_port


@ray.remote(concurrency_groups={"compute": 1, "control": 1, "learn": 1})
class StageActor:
    def __init__(self, model_dir: str, start: int, stop: int, index: int, num_stages: int,
                 head: str, exit_layer: int, dtype: str, threads: int | None, batched: bool = True,
                 head_version: int = 0, learn_positions: int = 0):
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        if device == "cpu":
            keep_freed_memory()
        if threads:
            torch.set_num_threads(threads)
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        # built on a passing thread: this one stays, and forwards run on another (kv.on_passing_thread)
        self.stage = on_passing_thread(lambda: Stage(
            model_dir, start, stop, index=index, num_stages=num_stages, head=head, exit_layer=exit_layer,
            dtype=dtype, device=device, batched=batched, head_version=head_version,
            learn_positions=learn_positions))
        self.loop: StageLoop | None = None

    @ray.method(concurrency_group="control")
    def ready(self) -> dict:
        """Where the stage runs; `pid` tells a restarted stage from the one before."""
        return {"index": self.stage.index, "layers": [self.stage.start, self.stage.stop],
                "device": str(self.stage.device), "threads": torch.get_num_threads(),
                "node": ray.util.get_node_ip_address(), "pid": os.getpid(), "busy_s": self.stage.busy_s()}

    @ray.method(concurrency_group="control")
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="control")
    def sequences(self) -> list[str]:
        return self.stage.sequences()

    # online learning (actors.learner): on a thread of their own, never waiting behind a forward

    @ray.method(concurrency_group="learn")
    def take_samples(self) -> Samples:
        return on_passing_thread(self.stage.take_samples)

    @ray.method(concurrency_group="learn")
    def install_head(self, version: int, path: str) -> None:
        on_passing_thread(self.stage.install_head, version, path)

    # transport "ray"

    @ray.method(concurrency_group="compute")
    def forward(self, work: Work, hop=None):
        return self.stage.forward(work, hop)

    @ray.method(concurrency_group="control")
    def rollback(self, seq_id: str, epoch: int) -> None:
        self.stage.rollback(seq_id, epoch)

    @ray.method(concurrency_group="compute")
    def release(self, seq_id: str, keep: int, events: bool = False):
        return self.stage.release(seq_id, keep, events)

    # transport "direct"

    @ray.method(concurrency_group="control")
    def open_inbox(self, max_batch_tokens: int = 512) -> str:
        """A new loop (after stopping any old one: a rebuilt pipeline reconnects everything)."""
        if self.loop is not None:
            self.loop.stop()
        self.loop = StageLoop(self.stage, ray.util.get_node_ip_address(), max_batch_tokens)
        return self.loop.address

    @ray.method(concurrency_group="control")
    def free_port(self) -> str:
        host = ray.util.get_node_ip_address()
        return f"{host}:{free_port(host)}"

    @ray.method(concurrency_group="compute")
    def join_group(self, world: int, master: str, backend: str) -> None:
        self.loop.group = TensorGroup(self.stage.index, world, master, backend)

    @ray.method(concurrency_group="control")
    def start_loop(self, stage_addresses: list[str], coordinator_address: str) -> None:
        self.loop.start(stage_addresses, coordinator_address)
