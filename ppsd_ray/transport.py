"""How hidden states move from stage to stage: the one transport boundary.

Every transport carries the same messages (ppsd_ray.protocol) and offers the
Decoder the same Pipe (submit, rollback, release):

- LocalPipe: the stages in this process, called in turn (tests, the reference).
- direct: each stage runs a persistent loop (StageLoop) in its own process. Headers
  and control messages go over plain TCP connections to the next stage's Inbox; in
  pp the last stage also feeds each Verdict to stage 1's inbox (a ring).
  A CPU hidden state (a few KB per token) rides in the same message as a second
  frame: one send, no second channel to wait on. Between GPUs it goes by NCCL
  point-to-point in a torch.distributed group the loops own (gloo works too, for
  tests of that path on CPU). The coordinator's DirectPipe sends Work to stage 1
  and control to every stage, and receives Verdicts and StageReports from the last
  stage on its own inbox. Per token there is no Ray call and no object ref: Ray only
  places the processes and starts the loops (actors.stage).
- ray: one actor call per stage per call, hidden states as object refs (actors.ray_pipe.RayPipe).

A stage loop runs every ready call it holds, one per sequence, as one forward
(Stage.forward_batch): continuous batching with no scheduler thread. Calls queue at
each stage while it computes; its next step takes them all, up to `max_batch_tokens`
tokens (a long prefill chunk waits for the next step rather than stall the others).
The batch travels on as one message: one hop of every call's header and their hidden
states as one tensor, one list of verdicts, one list of tokens fed round to stage 1.
"""
from __future__ import annotations

import contextlib
import operator
import pickle
import selectors
import socket
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import fields
from typing import Sequence

import torch

from .protocol import Hop, Sampling, StageReport, Verdict, Work


class LocalPipe:
    """The stages in this process: each call runs through every stage before submit returns."""

    def __init__(self, stages: Sequence):
        self.stages = list(stages)
        self._fed: dict[str, Verdict] = {}  # pp: the verdict stage 1's next call takes its token from

    def submit(self, work: Work) -> Verdict | None:
        out = self._fed.pop(work.seq_id, None) if work.tokens is None else None
        for stage in self.stages:
            out = stage.forward(work, out)
            if out is None:
                return None
        if work.feed:
            self._fed[work.seq_id] = out
        return out

    def rollback(self, seq_id: str, epoch: int) -> None:
        self._fed.pop(seq_id, None)
        for stage in self.stages:
            stage.rollback(seq_id, epoch)

    def release(self, seq_id: str, keep: int, events: bool = False) -> list[StageReport]:
        self._fed.pop(seq_id, None)
        return [stage.release(seq_id, keep, events) for stage in self.stages]


# ---- direct: persistent stage loops, TCP for headers and control, torch.distributed between GPUs


class StageError(RuntimeError):
    """A stage failed, died or stopped answering; names the stage (1-based in the message)."""

    def __init__(self, index: int | None, message: str):
        where = f"stage {index + 1}" if index is not None else "pipeline"
        super().__init__(f"{where}: {message}")
        self.index = index

    def __reduce__(self):  # crosses Ray with its stage
        return type(self), (self.index, str(self).split(": ", 1)[1])


_PREFIX = struct.Struct("!II")  # header bytes, payload bytes
_PARTIAL_MESSAGE_S = 30.0  # a message that started arriving and stopped: its sender died

# Headers travel as plain tuples: pickle takes about 8x longer over the dataclasses, and
# that much more again right after a stage step has evicted the interpreter from the caches.
_work_fields = operator.attrgetter(*(f.name for f in fields(Work)))  # `sampling` last
_sampling_fields = operator.attrgetter(*(f.name for f in fields(Sampling)))
_verdict_fields = operator.attrgetter(*(f.name for f in fields(Verdict)))


def _to_wire(msg: tuple) -> tuple:
    kind = msg[0]
    if kind == "hop":
        _, entries, shape, dtype = msg
        return "hop", [(_work_tuple(w), *rest) for w, *rest in entries], shape, str(dtype).removeprefix("torch.")
    if kind == "work":
        return "work", [_work_tuple(w) for w in msg[1]]
    if kind in ("verdicts", "feed"):
        return kind, [_verdict_fields(v) for v in msg[1]]
    return msg


def _from_wire(msg: tuple) -> tuple:
    kind = msg[0]
    if kind == "hop":
        _, entries, shape, dtype = msg
        return "hop", [(_work(w), *rest) for w, *rest in entries], shape, getattr(torch, dtype)
    if kind == "work":
        return "work", [_work(w) for w in msg[1]]
    if kind in ("verdicts", "feed"):
        return kind, [Verdict(*v) for v in msg[1]]
    return msg


def _work_tuple(work: Work) -> tuple:
    fields = _work_fields(work)
    return fields[:-1] + (_sampling_fields(fields[-1]),)


def _work(fields: tuple) -> Work:
    return Work(*fields[:-1], Sampling(*fields[-1]))


class Inbox:
    """Where a stage loop or the coordinator receives: one listening TCP socket that every
    peer connects to once. A message is a pickled header and an optional payload (a CPU
    hidden state), length-prefixed; a sender writes it with one sendmsg from its own
    thread. Plain sockets rather than ZMQ: no I/O threads to wake on either side, which
    on this 2-core machine was about a third of a hop.

    A peer may name itself when it connects (Outbox `name`); when its connection ends (its
    process died, or it was stopped) the inbox yields ("closed", name) in its place."""

    def __init__(self, host: str):
        self.listener = socket.create_server((host, 0))
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)

    def recv(self, timeout: float | None = None) -> tuple[tuple, memoryview] | None:
        """The next message from any peer and its payload; None when none came within
        `timeout` (0: only what has arrived)."""
        while True:
            events = self.selector.select(timeout)
            if not events:
                return None
            for key, _ in events:
                sock = key.fileobj
                if sock is self.listener:
                    conn, _ = self.listener.accept()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.settimeout(_PARTIAL_MESSAGE_S)
                    self.selector.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    n_header, n_payload = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
                    frames = memoryview(_recv_exact(sock, n_header + n_payload))  # one read: cold syscalls cost
                    msg, payload = _from_wire(pickle.loads(frames[:n_header])), frames[n_header:]
                except (OSError, EOFError):  # the peer went away; a rebuilt one connects anew
                    self.selector.unregister(sock)
                    sock.close()
                    if key.data is not None:
                        return ("closed", key.data), memoryview(b"")
                    continue
                if msg[0] in ("hello", "bye"):  # bye: the close that follows is not a death
                    self.selector.modify(sock, selectors.EVENT_READ, data=msg[1] if msg[0] == "hello" else None)
                    continue
                return msg, payload

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError("peer closed")
        got += k
    return buf


class Outbox:
    """A connection to one peer's Inbox. Not thread-safe: one sending thread, or a lock."""

    def __init__(self, address: str, name=None):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.named = name is not None
        if self.named:
            self.send(("hello", name))

    def send(self, msg, payload=b"") -> None:
        header = pickle.dumps(_to_wire(msg))
        header += bytes(-len(header) % 16)  # the payload lands as aligned as its buffer; pickle ignores the pad
        payload = memoryview(payload).cast("B")
        parts = [_PREFIX.pack(len(header), payload.nbytes), header, payload]
        sent = self.sock.sendmsg(parts)
        if sent < len(parts[0]) + len(header) + payload.nbytes:  # a long prompt's prefill: the rest, in order
            self.sock.sendall(memoryview(b"".join(parts))[sent:])

    def close(self) -> None:
        if self.named:
            with contextlib.suppress(OSError):
                self.send(("bye",))
        self.sock.close()


def _prompt_thread_switches() -> None:
    """A message handed from one thread to another (socket to queue, verdict to future) waits
    for the GIL; Python's default 5 ms switch interval would add up to that to every hop."""
    import sys

    sys.setswitchinterval(2e-4)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TensorGroup:
    """The stages' torch.distributed point-to-point group (gloo; NCCL when the stages own GPUs).
    Each loop owns its group object rather than torch's global default group, so a pipeline
    whose stage was rebuilt simply makes a new one. Rank = stage index; rank 0 hosts the store."""

    def __init__(self, rank: int, world: int, master: str, backend: str, timeout_s: float = 120):
        import datetime

        import torch.distributed as dist

        host, port = master.rsplit(":", 1)
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, int(port), world, is_master=rank == 0, timeout=timeout)
        self.pg = (dist.ProcessGroupNCCL(self.store, rank, world) if backend == "nccl"
                   else dist.ProcessGroupGloo(self.store, rank, world, timeout))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.pg.send([tensor], dst, 0).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.pg.recv([tensor], src, 0).wait()


def _call_tokens(msg: tuple) -> int:
    """The positions a queued ("run", work, hop) call computes."""
    _, work, hop = msg
    return hop.hidden.shape[1] if isinstance(hop, Hop) else len(work.tokens or (0,)) + work.chain


class StageLoop:
    """Runs one Stage behind the direct transport, in the stage's own process, on one thread.

    The loop reads its inbox in order: work and hops queue for the stage, a rollback takes
    effect at once, so queued calls it makes stale are skipped. While a call computes, the
    stage drains the inbox between layers (Stage.between_layers), so a rollback also stops
    the running call; no message waits for a thread hand-off. A hop's hidden state comes as
    the message's second frame, or, with a tensor group (NCCL between GPUs), from the
    previous rank right after its header. Each result goes on: a Hop to the next stage, a
    Verdict, a StageReport or an error to the coordinator. In pp the last stage feeds its
    Verdict to stage 1 first, where the next call waits for it (`_waiting`) unless it came
    first (`_fed`). A failure of the transport itself (a peer died) ends the loop after
    telling the coordinator; the pipeline then rebuilds it.

    Each step takes every queued call it can run, at most one per sequence (a sequence's
    next call needs this one's cache entries) and up to `max_batch_tokens` tokens, and
    runs them as one forward."""

    def __init__(self, stage, host: str, max_batch_tokens: int = 512):
        self.stage = stage
        self.max_batch_tokens = max_batch_tokens
        self.inbox = Inbox(host)
        self.address = self.inbox.address
        self.group: TensorGroup | None = None
        self._pending: deque = deque()
        self._waiting: dict[tuple[str, int], Work] = {}  # stage 1: (seq, pos) -> call whose token is on its way
        self._fed: dict[tuple[str, int], Verdict] = {}  # stage 1: (seq, pos) -> the verdict whose token enters
        self._thread: threading.Thread | None = None

    def start(self, stage_addresses: Sequence[str], coordinator_address: str) -> None:
        """Connects to the next stage's inbox (the coordinator's, for the last stage, which
        also connects to stage 1's: the ring that pp feeds tokens round) and starts the loop."""
        index, k = self.stage.index, len(stage_addresses)
        # the coordinator knows this loop by its connection: when it closes, the stage is gone
        self._coordinator = Outbox(coordinator_address, name=(index, self.address))
        self._next = Outbox(stage_addresses[index + 1]) if index + 1 < k else self._coordinator
        self._first = Outbox(stage_addresses[0]) if index + 1 == k and k > 1 else None
        self.stage.between_layers = self._drain
        self._thread = threading.Thread(target=self._run, daemon=True, name="ppsd-stage")
        self._thread.start()

    def _run(self) -> None:
        index = self.stage.index
        while True:
            try:
                if self._pending:  # a rollback that came meanwhile skips what it makes stale
                    self._drain()
                else:
                    self._read(self.inbox.recv())
            except Exception as e:  # the transport broke (a peer died): this loop is over
                self._send_coordinator(("error", None, index, f"receiving: {type(e).__name__}: {e}"))
                return
            if not self._pending:
                continue
            if self._pending[0][0] == "stop":
                return
            if self._pending[0][0] != "run":
                msg = self._pending.popleft()
                try:
                    self._handle(msg)
                except Exception as e:
                    self._send_coordinator(("error", msg[1], index, f"{type(e).__name__}: {e}"))
                continue
            batch = self._next_batch()
            if not batch:  # every call it held waits for its token
                continue
            try:
                self._run_batch(batch)
            except Exception as e:  # the coordinator fails the requests and names this stage
                for _, work, _ in batch:
                    self._send_coordinator(("error", work.seq_id, index, f"{type(e).__name__}: {e}"))

    def _next_batch(self) -> list[tuple]:
        """The queued calls that run together this step, from the front of the queue up to the
        first control message: one per sequence, the smallest first (the streams already
        running: a decode token, a draft, a verification), then prompt chunks oldest first,
        within the token budget; so a burst of long prompts does not stall the running streams.
        A pp call whose token has not come round yet waits aside (`_waiting`); the calls not
        taken keep their order."""
        scanned, runnable, seqs = [], [], set()
        while self._pending and self._pending[0][0] == "run":
            msg = self._pending.popleft()
            _, work, hop = msg
            if work.seq_id not in seqs and hop is None and self.stage.waits(work):  # pp: the token comes round
                fed = self._fed.pop((work.seq_id, work.pos), None)
                if fed is None:
                    self._waiting[work.seq_id, work.pos] = work
                    continue
                msg = ("run", work, fed)
            scanned.append(msg)
            if work.seq_id not in seqs:
                seqs.add(work.seq_id)
                runnable.append(msg)
        taken, tokens = set(), 0
        for msg in sorted(runnable, key=_call_tokens):  # stable: equal sizes keep their order
            n = _call_tokens(msg)
            if taken and tokens + n > self.max_batch_tokens:
                break
            taken.add(id(msg))
            tokens += n
        self._pending.extendleft(reversed([m for m in scanned if id(m) not in taken]))
        return [m for m in runnable if id(m) in taken]

    def _run_batch(self, batch: list[tuple]) -> None:
        outs = self.stage.forward_batch([(work, hop) for _, work, hop in batch])
        verdicts = [out for out in outs if isinstance(out, Verdict)]
        fed = [out for (_, work, _), out in zip(batch, outs) if isinstance(out, Verdict) and work.feed]
        hops = [out for out in outs if isinstance(out, Hop)]
        if fed:  # the tokens go round to stage 1 before the coordinator hears of them
            if self._first is None:  # one stage: it is stage 1
                self._read((("feed", fed), memoryview(b"")))
            else:
                self._first.send(("feed", fed))
        if verdicts:
            self._send_coordinator(("verdicts", verdicts))
        if hops:
            hidden = torch.cat([h.hidden for h in hops], dim=1).contiguous() if len(hops) > 1 \
                else hops[0].hidden.contiguous()
            header = ("hop", [(h.work, h.hidden.shape[1], h.drafts, h.draft_dists) for h in hops],
                      tuple(hidden.shape), hidden.dtype)
            if self.group is None:
                self._next.send(header, hidden.view(torch.uint8).numpy())
            else:
                self._next.send(header)
                self.group.send(hidden, dst=self.stage.index + 1)

    def _drain(self) -> None:
        while (message := self.inbox.recv(timeout=0)) is not None:
            self._read(message)

    def _read(self, message: tuple[tuple, memoryview]) -> None:
        msg, payload = message
        kind = msg[0]
        if kind == "rollback":
            _, seq_id, epoch = msg
            self.stage.rollback(seq_id, epoch)
            for key in [k for k in self._fed if k[0] == seq_id and self._fed[k].epoch < epoch]:
                del self._fed[key]
            for key in [k for k in self._waiting if k[0] == seq_id and self._waiting[k].epoch < epoch]:
                self._pending.append(("run", self._waiting.pop(key), None))  # skipped as stale, and counted
        elif kind == "feed":
            for verdict in msg[1]:
                key = (verdict.seq_id, verdict.pos + 1)
                if key in self._waiting:
                    self._pending.append(("run", self._waiting.pop(key), verdict))
                elif self.stage.live(verdict.seq_id, verdict.epoch):  # its call is still queued here
                    self._fed[key] = verdict
        elif kind == "hop":
            _, entries, shape, dtype = msg
            if self.group is None:
                hidden = torch.frombuffer(payload, dtype=dtype).view(shape)
            else:
                hidden = torch.empty(shape, dtype=dtype, device=self.stage.device)
                self.group.recv(hidden, src=self.stage.index - 1)
            parts = hidden.split([e[1] for e in entries], dim=1) if len(entries) > 1 else [hidden]
            for (work, n, drafts, dists), part in zip(entries, parts):
                self._pending.append(("run", work, Hop(work, part, drafts, dists)))
        elif kind == "work":
            self._pending.extend(("run", work, None) for work in msg[1])
        else:  # release, stop
            self._pending.append(msg)

    def _handle(self, msg) -> None:
        _, seq_id, keep, events = msg  # release
        for held in (self._fed, self._waiting):
            for key in [k for k in held if k[0] == seq_id]:
                del held[key]
        self._send_coordinator(("report", seq_id, self.stage.index, self.stage.release(seq_id, keep, events)))

    def _send_coordinator(self, msg) -> None:
        with contextlib.suppress(OSError):  # the coordinator is gone: no one is left to tell
            self._coordinator.send(msg)

    def stop(self) -> None:
        """Ends the loop (a thread stuck on a dead peer is left behind as a daemon)."""
        with contextlib.suppress(OSError):
            stop = Outbox(self.address)
            stop.send(("stop",))
            stop.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.stage.between_layers = None
        if self._thread is not None:  # started: it holds connections
            for box in {self._next, self._coordinator, self._first} - {None}:
                box.close()
        self.inbox.close()


class DirectPipe:
    """The coordinator's side of the direct transport: Work to stage 1, control to every
    stage, Verdicts and StageReports back on its own inbox; each answer is a Future."""

    def __init__(self, host: str, timeout_s: float = 120.0):
        _prompt_thread_switches()
        self.timeout_s = timeout_s
        self.inbox = Inbox(host)
        self.address = self.inbox.address
        self._lock = threading.Lock()  # requests run on several threads, answers arrive on another
        self._send_lock = threading.Lock()
        self._verdicts: dict[tuple[str, int, int], Future] = {}
        self._reports: dict[tuple[str, int], Future] = {}
        self._failed: dict[str, StageError] = {}
        self._stages: list = []
        self._heard = time.monotonic()  # the last answer of any kind, for any sequence
        threading.Thread(target=self._receive, daemon=True, name="ppsd-verdicts").start()

    def connect(self, stage_addresses: Sequence[str]) -> None:
        """To every stage's inbox (again, after a rebuild)."""
        with self._send_lock:
            for box in self._stages:
                box.close()
            self._stages = [Outbox(a) for a in stage_addresses]

    def _send(self, index: int, msg) -> StageError | None:
        """The error naming the stage when it cannot be reached (its process died)."""
        try:
            with self._send_lock:
                self._stages[index].send(msg)
        except OSError as e:
            return StageError(index, f"unreachable: {type(e).__name__}: {e}")
        return None

    def submit(self, work: Work) -> Future:
        fut: Future = Future()
        with self._lock:
            failed = self._failed.get(work.seq_id)
            self._verdicts[work.seq_id, work.epoch, work.pos] = fut
        failed = failed or self._send(0, ("work", [work]))
        if failed:
            fut.set_exception(failed)
        return fut

    def rollback(self, seq_id: str, epoch: int) -> None:
        for i in range(len(self._stages)):
            self._send(i, ("rollback", seq_id, epoch))  # a stage it cannot reach holds nothing to roll back
        with self._lock:  # answers to stale calls never come
            for key in [k for k in self._verdicts if k[0] == seq_id and k[1] < epoch]:
                del self._verdicts[key]

    def release(self, seq_id: str, keep: int, events: bool = False) -> list[Future]:
        futures = []
        with self._lock:
            self._failed.pop(seq_id, None)
            for key in [k for k in self._verdicts if k[0] == seq_id]:
                del self._verdicts[key]
            for i in range(len(self._stages)):
                futures.append(self._reports.setdefault((seq_id, i), Future()))
        for i, fut in enumerate(futures):
            failed = self._send(i, ("release", seq_id, keep, events))
            if failed:
                with self._lock:
                    self._reports.pop((seq_id, i), None)
                fut.set_exception(failed)
        return futures

    def get(self, fut: Future):
        """The answer; an error once the stages have answered nothing at all, to any sequence, for
        timeout_s. A request queued behind others' work (32 long prompts prefilling) waits on."""
        start = time.monotonic()
        while True:
            remaining = max(start, self._heard) + self.timeout_s - time.monotonic()
            if remaining <= 0:
                raise StageError(None, f"no answer within {self.timeout_s:.0f} s")
            try:
                return fut.result(timeout=remaining)
            except TimeoutError:
                continue

    def fail(self, error: StageError, seq_id: str | None = None) -> None:
        """The requests waiting on `seq_id`, or on the pipeline at all, get `error`."""
        with self._lock:
            verdicts = [k for k in self._verdicts if seq_id in (None, k[0])]
            reports = [k for k in self._reports if seq_id in (None, k[0])]
            pending = [self._verdicts.pop(k) for k in verdicts] + [self._reports.pop(k) for k in reports]
            for seq in {k[0] for k in verdicts} | ({seq_id} if seq_id else set()):
                self._failed[seq] = error
        for fut in pending:
            if not fut.done():
                fut.set_exception(error)

    def clear_failures(self) -> None:
        """After a rebuild: requests may submit again."""
        with self._lock:
            self._failed.clear()

    def _receive(self) -> None:
        while True:
            msg, _ = self.inbox.recv()
            kind = msg[0]
            self._heard = time.monotonic()
            with self._lock:
                if kind == "verdicts":
                    fut = [(self._verdicts.pop((v.seq_id, v.epoch, v.pos), None), v) for v in msg[1]]
                elif kind == "report":
                    fut = self._reports.pop((msg[1], msg[2]), None)
                elif kind == "closed":  # a stage's process died: everything in flight is lost
                    index, seq_id = msg[1][0], None
                    error = StageError(index, "died (its connection to the coordinator closed)")
                    fut = None
                else:  # an error: every answer this sequence waits for fails (all of them: the transport's)
                    _, seq_id, index, text = msg
                    error = StageError(index, text)
                    fut = None
            if kind == "verdicts":
                for f, v in fut:
                    if f is not None and not f.done():
                        f.set_result(v)
            elif kind == "report":
                if fut is not None and not fut.done():
                    fut.set_result(msg[3])
            else:
                self.fail(error, seq_id)
