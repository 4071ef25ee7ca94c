"""Coordinator: runs the verify-while-draft schedule against the stage actors and
streams committed tokens to the caller as soon as they are verified."""
from __future__ import annotations

import time

import ray

from ppsd_ray.config import GenerationConfig
from ppsd_ray.schedule import Decoder, RequestStats

from .metrics import PipelineMetrics
from .stage import RemoteStage


@ray.remote(num_cpus=0, max_concurrency=8, concurrency_groups={"control": 1})
class Coordinator:
    """Each request runs on its own thread with its own sequence id, so requests can
    share the stages; their calls interleave in the stages' queues."""

    def __init__(self, stages: list, eos_token_ids: list[int], window: int | None):
        self.decoder = Decoder([RemoteStage(s) for s in stages], get=ray.get,
                               eos_token_ids=eos_token_ids, window=window)
        self.metrics = PipelineMetrics()
        self._running: set[str] = set()
        self._cancelled: set[str] = set()

    @ray.method(num_returns="streaming")
    def generate(self, seq_id: str, prompt_ids: list[int], gen: dict):
        """Yields token ids, then one final dict: the request's stats. Stops early, between
        tokens, after cancel(seq_id)."""
        stats = RequestStats()
        gen = GenerationConfig(**gen)
        mode, status, t0, first = gen.mode.value, "error", time.perf_counter(), True
        tokens = self.decoder.decode(seq_id, prompt_ids, gen, stats)
        self.metrics.started()
        self._running.add(seq_id)
        try:
            for token in tokens:
                if first:
                    self.metrics.first_token(mode, time.perf_counter() - t0)
                    first = False
                yield token
                if seq_id in self._cancelled:
                    status = "cancelled"
                    return
            status = "ok"
        finally:
            self._running.discard(seq_id)
            self._cancelled.discard(seq_id)
            tokens.close()  # releases the sequence on every stage, fills stats.stages
            self.metrics.finished(mode, status, len(prompt_ids), stats.to_dict(), time.perf_counter() - t0)
        yield stats.to_dict()

    @ray.method(concurrency_group="control")
    def cancel(self, seq_id: str) -> None:
        """Stops a running request after its next token (its caller went away)."""
        if seq_id in self._running:
            self._cancelled.add(seq_id)
