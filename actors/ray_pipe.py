"""transport "ray": the stages' calls as actor calls, hidden states as object refs. Its own
module, so that the coordinator's process does not import the stage's model code."""
from __future__ import annotations

from ppsd_ray.protocol import Work


class RayPipe:
    """transport "ray": each stage's call is an actor call given the previous stage's answer
    as an object ref; submit answers with the ref of the last stage's Verdict. In pp stage 1's
    next call is given that ref too: Ray hands it the verdict without the coordinator."""

    def __init__(self, handles: list):
        self.handles = handles
        self._fed: dict = {}  # seq_id -> ref of the verdict stage 1's next call takes its token from

    def submit(self, work: Work):
        ref = self._fed.pop(work.seq_id, None) if work.tokens is None else None
        for h in self.handles:
            ref = h.forward.remote(work, ref)
        if work.feed:
            self._fed[work.seq_id] = ref
        return ref

    def rollback(self, seq_id: str, epoch: int) -> None:
        self._fed.pop(seq_id, None)
        for h in self.handles:
            h.rollback.remote(seq_id, epoch)

    def release(self, seq_id: str, keep: int, events: bool = False) -> list:
        self._fed.pop(seq_id, None)
        return [h.release.remote(seq_id, keep, events) for h in self.handles]
