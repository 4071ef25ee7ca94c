"""Coordinator: runs the verify-while-draft schedule against the stage actors and
streams committed tokens to the caller as soon as they are verified."""
from __future__ import annotations

import contextlib
import pickle
import threading
import time
import uuid
from dataclasses import dataclass

import ray

from ppsd_ray.admission import Admission
from ppsd_ray.config import GenerationConfig, Mode, Transport
from ppsd_ray.schedule import Decoder, RequestStats
from ppsd_ray.transport import DirectPipe, StageError

from .metrics import PipelineMetrics
from .ray_pipe import RayPipe

WATCH_S = 1.0  # how often the direct transport's coordinator checks that every stage is alive
CANCEL_MEMORY_S = 300.0  # how long a cancel waits for its request to start (it may be queued)
WAITING_S = 5.0  # while a request waits for admission, generate yields WAITING this often
WAITING = None


@dataclass(frozen=True)
class Health:
    """The answer to a health probe."""
    token: int                    # the probe's greedy token: every stage computed
    running: int                  # requests being decoded
    sequences: list[list[str]]    # per stage: the sequence ids holding state there
    stage_pids: list[int]         # per stage: the process the pipeline was last built on
    repairs: int                  # times the pipeline was rebuilt after a stage died


@dataclass(frozen=True)
class Failed:
    """A request's error on a feed: the exception, or, one that does not pickle, its text."""
    error: Exception

    @staticmethod
    def of(error: Exception) -> "Failed":
        try:
            pickle.dumps(error)
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return Failed(error)


class Feed:
    """The items of one caller's requests, waiting for its feed to take them."""

    def __init__(self):
        self._items: list[tuple[str, object]] = []
        self._ready = threading.Condition()

    def put(self, seq_id: str, item) -> None:
        with self._ready:
            self._items.append((seq_id, item))
            self._ready.notify()

    def take(self) -> list[tuple[str, object]]:
        with self._ready:
            self._ready.wait_for(lambda: self._items)
            items, self._items = self._items, []
        return items


@ray.remote(num_cpus=0, concurrency_groups={"control": 1, "health": 1})
class Coordinator:
    """Each request runs on its own thread with its own sequence id, so requests share the
    stages: their calls meet in the stages' queues, and each stage step runs them as one
    forward. At most `max_num_seqs` requests decode at once (admission); the others wait
    here for a slot, in order, holding nothing in the stages. Pipeline sets the actor's
    max_concurrency to cover those waiting too.

    It also keeps the pipeline whole: stage actors restart (Ray's max_restarts) when their
    process dies; a request that breaks on it calls `repair`, which waits for the restarted
    stage, reconnects the direct transport, and lets every request go on from its committed
    tokens (Decoder.decode)."""

    def __init__(self, stages: list, eos_token_ids: list[int], window: int | None, transport: str,
                 timeout_s: float, tensor_group: str | None = None, max_num_seqs: int = 32,
                 prefill_chunk: int | None = None, max_batch_tokens: int = 512, kv_budget_tokens: int = 2**40,
                 draft_max_seqs: int | None = None, default_mode: str | None = None):
        """tensor_group, direct transport only: None sends hidden states inside the stages'
        messages (CPU stages); "nccl" (GPU stages) or "gloo" by torch.distributed point-to-point."""
        self.stages = stages
        self.transport, self.tensor_group, self.timeout_s = Transport(transport), tensor_group, timeout_s
        self.max_batch_tokens = max_batch_tokens
        if self.transport == Transport.direct:
            self.pipe = DirectPipe(ray.util.get_node_ip_address(), timeout_s)
            get = self.pipe.get
        else:
            self.pipe = RayPipe(stages)
            get = self._ray_get
        self.generation = 0
        self._repair_lock = threading.Lock()
        self._pids: list[int] = []
        self.admission = Admission(max_num_seqs, kv_budget_tokens)
        may_draft = (lambda: True) if draft_max_seqs is None else (lambda: self.admission.seqs <= draft_max_seqs)
        self.decoder = Decoder(self.pipe, len(stages), get=get, eos_token_ids=eos_token_ids, window=window,
                               repair=self, prefill_chunk=prefill_chunk, may_draft=may_draft,
                               default_mode=Mode(default_mode) if default_mode else None)
        self.metrics = PipelineMetrics()
        self._running: set[str] = set()
        self._cancelled: dict[str, float] = {}  # seq_id: when cancel() came
        self._feeds: dict[str, Feed] = {}

    def connect(self) -> None:
        """Called once the stages are up (the actor is made while they load, so that both
        import at once): notes their processes and, direct, starts the stages' loops."""
        self._pids = self._stage_pids()
        if self.transport == Transport.direct:
            self._connect_direct()
            threading.Thread(target=self._watch, daemon=True, name="ppsd-watch").start()

    def _ray_get(self, ref):
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise StageError(None, f"no answer within {self.timeout_s:.0f} s") from None

    def _stage_pids(self) -> list[int]:
        """Each stage's process id; waits for a restarting stage (up to timeout_s)."""
        return [r["pid"] for r in self._ready()]

    def _ready(self) -> list[dict]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return ray.get([s.ready.remote() for s in self.stages], timeout=self.timeout_s)
            except ray.exceptions.RayActorError:  # died under this call, or restarting: ask again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _connect_direct(self) -> None:
        """Opens every inbox, forms the stages' tensor group and starts the loops; after this no
        token travels through Ray. Run again, whole, after a stage was rebuilt."""
        wait = self.timeout_s
        inboxes = ray.get([s.open_inbox.remote(self.max_batch_tokens) for s in self.stages], timeout=wait)
        if self.tensor_group and len(self.stages) > 1:
            master = ray.get(self.stages[0].free_port.remote(), timeout=wait)
            ray.get([s.join_group.remote(len(self.stages), master, self.tensor_group) for s in self.stages],
                    timeout=wait)
        ray.get([s.start_loop.remote(inboxes, self.pipe.address) for s in self.stages], timeout=wait)
        self.pipe.connect(inboxes)

    def _watch(self) -> None:
        """direct: a stage that died or restarted is noticed within seconds and the pipeline
        repaired, even with no request running."""
        while True:
            time.sleep(WATCH_S)
            generation = self.generation
            for i, stage in enumerate(self.stages):
                try:
                    pid = ray.get(stage.ready.remote(), timeout=10 * WATCH_S)["pid"]
                except Exception as e:
                    pid = f"unreachable ({type(e).__name__})"
                if pid != self._pids[i] and generation == self.generation:
                    with contextlib.suppress(Exception):  # a stage that cannot come back fails its requests
                        self(StageError(i, "died" if isinstance(pid, str) else "restarted"), generation)
                    break

    def __call__(self, error: Exception, generation: int) -> None:
        """Decoder's repair: returns once the pipeline is whole again, or re-raises `error`
        (naming the hung stage) when no stage died."""
        with self._repair_lock:
            if generation != self.generation:
                return  # another request repaired it meanwhile
            pids = self._stage_pids()
            if pids == self._pids:
                busy = [r["busy_s"] for r in self._ready()]
                if isinstance(error, StageError) and error.index is None and max(busy) > 0:
                    i = busy.index(max(busy))
                    raise StageError(i, f"hung: one call running for {busy[i]:.0f} s ({error})") from error
                raise error
            if self.transport == Transport.direct:
                self.pipe.fail(StageError(None, "rebuilding"))
                self._connect_direct()
                self.pipe.clear_failures()
            self._pids = pids
            self.generation += 1

    @ray.method(num_returns="streaming")
    def generate(self, seq_id: str, prompt_ids: list[int], gen: dict):
        """Yields token ids, then one final dict: the request's stats; before them, WAITING
        (None) every WAITING_S while the request waits for admission. Stops early, between
        tokens, after cancel(seq_id); yields no token when cancelled before it started."""
        yield from self._request(seq_id, prompt_ids, gen)

    def start(self, feed: str, seq_id: str, prompt_ids: list[int], gen: dict) -> None:
        """Starts a request whose items (generate's) go to `feed`, on a thread of its own;
        a failure goes there too, as a Failed item."""
        box = self._feeds.setdefault(feed, Feed())
        threading.Thread(target=self._deliver, args=(box, seq_id, prompt_ids, gen), daemon=True,
                         name="ppsd-request").start()

    def _deliver(self, box: "Feed", seq_id: str, prompt_ids: list[int], gen: dict) -> None:
        try:
            for item in self._request(seq_id, prompt_ids, gen):
                box.put(seq_id, item)
        except Exception as e:
            box.put(seq_id, Failed.of(e))

    @ray.method(num_returns="streaming")
    def feed(self, feed: str):
        """Yields, for as long as the actor lives, lists of (seq_id, item): what the requests
        started on `feed` gave since the last yield. One Ray item carries a step's tokens of
        every such request: Ray's streaming costs about 0.33 ms of this process's CPU and 0.4
        ms of the caller's per item (measured, Intel Xeon): with a token per item, about 12 ms of
        CPU a step at 16 streams, on the cores the stages compute on."""
        box = self._feeds.setdefault(feed, Feed())
        while True:
            yield box.take()

    def _request(self, seq_id: str, prompt_ids: list[int], gen: dict):
        stats = RequestStats()
        gen = GenerationConfig(**gen)
        if gen.mode == Mode.auto:
            gen = gen.model_copy(update={"mode": self.decoder.default_mode})
        mode, status, t0, first = gen.mode.value, "error", time.perf_counter(), True
        tokens = self.decoder.decode(seq_id, prompt_ids, gen, stats)
        ticket = self.admission.join(len(prompt_ids) + gen.max_new_tokens)
        while not (admitted := self.admission.wait(ticket, WAITING_S)):  # admission: a slot and KV room
            if seq_id in self._cancelled:
                self.admission.leave(ticket)
                break
            yield WAITING  # the caller's deadline for the next token is for a pipeline that runs
        self.metrics.started()
        self._running.add(seq_id)
        try:
            if seq_id in self._cancelled:  # cancelled while queued: no prefill
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
            if admitted:
                self.admission.release(ticket.tokens)
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
        return Health(token, len(self._running), sequences, list(self._pids), self.generation)
