"""A one-stage plan in the caller's process: the Stage and the token loop, no Ray.

One stage pipelines nothing; in an actor it only adds Ray (its daemons beside the
stage's threads, a hop and a feed item per token). actors.pipeline.Pipeline runs a
plan here when the plan says so (plan.in_process); the requests, their output and
their stats are the same as through the actor.
"""
from __future__ import annotations

import threading
import uuid
from typing import Iterator

from .config import GenerationConfig, PipelineConfig
from .kv import keep_freed_memory, torch_threads
from .schedule import Decoder, RequestStats, TokenLogprobs
from .stage import Stage
from .transport import LocalPipe


class LocalPipeline:
    """Streams may interleave; each step of one runs alone (a Stage is not for two threads at
    once). Fastest with every request on one thread: libgomp keeps a thread pool for each
    thread that runs torch (kv.on_passing_thread)."""

    def __init__(self, config: PipelineConfig, plan):
        if plan.device == "cpu":
            keep_freed_memory()  # as a stage's own process does: a prefill's activations reuse memory
        self.threads = plan.threads
        with torch_threads(self.threads):
            self.stage = Stage(config.model_dir, 0, config.info.num_layers, dtype=plan.dtype, device=plan.device,
                               batched=config.batched_stages)
        self.decoder = Decoder(LocalPipe([self.stage]), 1, eos_token_ids=config.info.eos_token_ids,
                               prefill_chunk=config.prefill_chunk, default_mode=plan.mode)
        self._lock = threading.Lock()

    def stream(self, prompt_ids: list[int], gen: GenerationConfig) -> Iterator[int | TokenLogprobs | dict]:
        """As Pipeline.stream: each token as it is verified, then the stats dict. Closing it
        early releases the sequence."""
        stats = RequestStats()
        tokens = self.decoder.decode(uuid.uuid4().hex, prompt_ids, gen, stats)
        try:
            while True:
                with self._lock, torch_threads(self.threads):
                    token = next(tokens, None)
                if token is None:
                    break
                yield token
        finally:
            with self._lock, torch_threads(self.threads):
                tokens.close()  # releases the sequence, fills stats.stages
        yield stats.to_dict()
