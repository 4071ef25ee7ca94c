"""StageActor: one ppsd_ray.stage.Stage in its own process (and GPU, when there is one).

forward and release run on the "compute" thread, one call at a time. rollback
runs on the "control" thread, so it takes effect while the calls it makes stale
are still queued behind the running one: they are then skipped, not computed.
"""
from __future__ import annotations

import ray
import torch

from ppsd_ray.stage import Stage


@ray.remote(concurrency_groups={"compute": 1, "control": 1})
class StageActor:
    def __init__(self, model_dir: str, start: int, stop: int, index: int, num_stages: int,
                 head: str, exit_layer: int, dtype: str, threads: int | None):
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        if threads:
            torch.set_num_threads(threads)
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.stage = Stage(model_dir, start, stop, index=index, num_stages=num_stages,
                           head=head, exit_layer=exit_layer, dtype=dtype, device=device)

    def ready(self) -> dict:
        return {"index": self.stage.index, "layers": [self.stage.start, self.stage.stop],
                "device": str(self.stage.device), "threads": torch.get_num_threads()}

    @ray.method(num_returns=2, concurrency_group="compute")
    def forward(self, seq_id: str, epoch: int, pos: int, *inputs, heads: int = 1):
        return self.stage.forward(seq_id, epoch, pos, *inputs, heads=heads)

    @ray.method(concurrency_group="control")
    def rollback(self, seq_id: str, epoch: int) -> None:
        self.stage.rollback(seq_id, epoch)

    @ray.method(concurrency_group="compute")
    def release(self, seq_id: str, keep: int, events: bool = False) -> dict:
        return self.stage.release(seq_id, keep, events)


class RemoteStage:
    """The schedule's port to a StageActor: the same calls, answered with object refs."""

    def __init__(self, handle):
        self.handle = handle

    def forward(self, seq_id, epoch, pos, *inputs, heads=1):
        return self.handle.forward.remote(seq_id, epoch, pos, *inputs, heads=heads)

    def rollback(self, seq_id, epoch):
        return self.handle.rollback.remote(seq_id, epoch)

    def release(self, seq_id, keep, events=False):
        return self.handle.release.remote(seq_id, keep, events)
