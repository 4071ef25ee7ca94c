"""Coordinator: runs the verify-while-draft schedule against the stage actors and
streams committed tokens to the caller as soon as they are verified."""
from __future__ import annotations

import ray

from ppsd_ray.config import GenerationConfig
from ppsd_ray.schedule import Decoder, RequestStats

from .stage import RemoteStage


@ray.remote(num_cpus=0, max_concurrency=8)
class Coordinator:
    """Each request runs on its own thread with its own sequence id, so requests can
    share the stages; their calls interleave in the stages' queues."""

    def __init__(self, stages: list, eos_token_ids: list[int], window: int | None):
        self.decoder = Decoder([RemoteStage(s) for s in stages], get=ray.get,
                               eos_token_ids=eos_token_ids, window=window)

    @ray.method(num_returns="streaming")
    def generate(self, seq_id: str, prompt_ids: list[int], gen: dict):
        """Yields token ids, then one final dict: the request's stats."""
        stats = RequestStats()
        yield from self.decoder.decode(seq_id, prompt_ids, GenerationConfig(**gen), stats)
        yield stats.to_dict()
