"""Coordinator: runs the verify-while-draft schedule against the stage actors and
streams committed tokens to the caller as soon as they are verified."""
from __future__ import annotations

import time

import ray

from ppsd_ray.config import GenerationConfig
from ppsd_ray.schedule import Decoder, RequestStats

from .metrics import PipelineMetrics
from .stage import RemoteStage


@ray.remote(num_cpus=0, max_concurrency=8)
class Coordinator:
    """Each request runs on its own thread with its own sequence id, so requests can
    share the stages; their calls interleave in the stages' queues."""

    def __init__(self, stages: list, eos_token_ids: list[int], window: int | None):
        self.decoder = Decoder([RemoteStage(s) for s in stages], get=ray.get,
                               eos_token_ids=eos_token_ids, window=window)
        self.metrics = PipelineMetrics()

    @ray.method(num_returns="streaming")
    def generate(self, seq_id: str, prompt_ids: list[int], gen: dict):
        """Yields token ids, then one final dict: the request's stats. Stops early, between
        tokens, when the caller cancels (ray.cancel) the generator."""
        stats = RequestStats()
        gen = GenerationConfig(**gen)
        mode, status, t0, first = gen.mode.value, "error", time.perf_counter(), True
        context = ray.get_runtime_context()
        tokens = self.decoder.decode(seq_id, prompt_ids, gen, stats)
        self.metrics.started()
        try:
            for token in tokens:
                if first:
                    self.metrics.first_token(mode, time.perf_counter() - t0)
                    first = False
                yield token
                if context.is_canceled():  # a local flag: ray.cancel(generator, recursive=False)
                    status = "cancelled"
                    return
            status = "ok"
        finally:
            tokens.close()  # releases the sequence on every stage, fills stats.stages
            self.metrics.finished(mode, status, len(prompt_ids), stats.to_dict(), time.perf_counter() - t0)
        yield stats.to_dict()
