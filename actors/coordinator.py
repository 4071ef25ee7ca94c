"""Coordinator: runs the verify-while-draft schedule against the stage actors and
streams committed tokens to the caller as soon as they are verified."""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import ray

from ppsd_ray.config import GenerationConfig, Transport
from ppsd_ray.schedule import Decoder, RequestStats
from ppsd_ray.transport import DirectPipe, StageError

from .metrics import PipelineMetrics
from .stage import RayPipe

WATCH_S = 1.0  # how often the direct transport's coordinator checks that every stage is alive
CANCEL_MEMORY_S = 300.0  # how long a cancel waits for its request to start (it may be queued)


@dataclass(frozen=True)
class Health:
    """The answer to a health probe."""
    token: int                    # the probe's greedy token: every stage computed
    running: int                  # requests being decoded
    sequences: list[list[str]]    # per stage: the sequence ids holding state there


@ray.remote(num_cpus=0, max_concurrency=8, concurrency_groups={"control": 1, "health": 1})
class Coordinator:
    """Each request runs on its own thread with its own sequence id, so requests can
    share the stages; their calls interleave in the stages' queues."""

    def __init__(self, stages: list, eos_token_ids: list[int], window: int | None, transport: str,
                 timeout_s: float):
        self.stages = stages
        if Transport(transport) == Transport.direct:
            self.pipe = DirectPipe(ray.util.get_node_ip_address(), timeout_s)
            get = self.pipe.get
        else:
            self.pipe = RayPipe(stages)
            get = lambda ref: ray.get(ref, timeout=timeout_s)  # noqa: E731
        self.decoder = Decoder(self.pipe, len(stages), get=get, eos_token_ids=eos_token_ids, window=window)
        self.metrics = PipelineMetrics()
        self._running: set[str] = set()
        self._cancelled: dict[str, float] = {}  # seq_id: when cancel() came

    @ray.method(concurrency_group="control")
    def inbox(self) -> str:
        """direct: the address the last stage sends verdicts and every stage its reports to."""
        return self.pipe.address

    @ray.method(concurrency_group="control")
    def connect(self, stage_addresses: list[str]) -> None:
        self.pipe.connect(stage_addresses)
        threading.Thread(target=self._watch, daemon=True, name="ppsd-watch").start()

    def _watch(self) -> None:
        """direct: a dead stage fails every waiting request within seconds, naming the stage."""
        while True:
            for i, stage in enumerate(self.stages):
                try:
                    ray.get(stage.ready.remote(), timeout=10 * WATCH_S)
                except Exception as e:
                    self.pipe.fail(StageError(i, f"not answering ({type(e).__name__})"))
            time.sleep(WATCH_S)

    @ray.method(num_returns="streaming")
    def generate(self, seq_id: str, prompt_ids: list[int], gen: dict):
        """Yields token ids, then one final dict: the request's stats. Stops early, between
        tokens, after cancel(seq_id); yields nothing when cancelled before it started."""
        stats = RequestStats()
        gen = GenerationConfig(**gen)
        mode, status, t0, first = gen.mode.value, "error", time.perf_counter(), True
        tokens = self.decoder.decode(seq_id, prompt_ids, gen, stats)
        self.metrics.started()
        self._running.add(seq_id)
        try:
            if seq_id in self._cancelled:  # cancelled while queued for a thread: no prefill
                status = "cancelled"
                return
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
            self._cancelled.pop(seq_id, None)
            tokens.close()  # releases the sequence on every stage, fills stats.stages
            self.metrics.finished(mode, status, len(prompt_ids), stats, time.perf_counter() - t0)
        yield stats.to_dict()

    @ray.method(concurrency_group="control")
    def cancel(self, seq_id: str) -> None:
        """Stops a request after its next token, or before its prefill when it still waits
        for a thread (its caller went away). Unclaimed cancels are forgotten after a while."""
        now = time.monotonic()
        for old in [s for s, t in list(self._cancelled.items()) if now - t > CANCEL_MEMORY_S]:
            self._cancelled.pop(old, None)
        self._cancelled[seq_id] = now

    @ray.method(concurrency_group="health")
    def health(self, prompt_ids: list[int], mode: str, timeout_s: float) -> Health:
        """A health probe: one greedy token of prompt_ids through every stage, then what each
        stage holds. On a thread of its own, so it never waits behind requests; not counted
        in the metrics."""
        stats = RequestStats()
        gen = GenerationConfig(mode=mode, max_new_tokens=1)
        tokens = self.decoder.decode(f"health-{uuid.uuid4().hex}", prompt_ids, gen, stats)
        try:
            token = int(next(tokens))
        finally:
            tokens.close()  # releases the probe's sequence on every stage
        sequences = ray.get([s.sequences.remote() for s in self.stages], timeout=timeout_s)
        return Health(token, len(self._running), sequences)
