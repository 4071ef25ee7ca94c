"""How hidden states move from stage to stage: the one transport boundary.

Every transport carries the same messages (ppsd_ray.protocol) and offers the
Decoder the same Pipe (submit, rollback, release):

- LocalPipe: the stages in this process, called in turn (tests, the reference).
- direct: each stage runs a persistent loop (StageLoop) in its own process. Headers
  and control messages go over ZMQ sockets (PUSH to the next stage's PULL inbox);
  hidden states go by torch.distributed point-to-point (gloo for CPU tensors, NCCL
  when every stage owns a GPU). The coordinator's DirectPipe sends Work to stage 1
  and control to every stage, and receives Verdicts and StageReports from the last
  stage on its own inbox. Per token there is no Ray call and no object ref: Ray only
  places the processes and starts the loops (actors.stage).
- ray: one actor call per stage per call, hidden states as object refs (actors.stage.RayPipe).

A direct message is a list of Work headers (one per sequence in the call), so several
sequences can later share a forward without a new protocol.
"""
from __future__ import annotations

import pickle
import queue
import socket
import threading
import time
from concurrent.futures import Future
from typing import Sequence

import torch

from .protocol import Hop, StageReport, Verdict, Work


class LocalPipe:
    """The stages in this process: each call runs through every stage before submit returns."""

    def __init__(self, stages: Sequence):
        self.stages = list(stages)

    def submit(self, work: Work) -> Verdict | None:
        out = None
        for stage in self.stages:
            out = stage.forward(work, out)
            if out is None:
                return None
        return out

    def rollback(self, seq_id: str, epoch: int) -> None:
        for stage in self.stages:
            stage.rollback(seq_id, epoch)

    def release(self, seq_id: str, keep: int, events: bool = False) -> list[StageReport]:
        return [stage.release(seq_id, keep, events) for stage in self.stages]


# ---- direct: persistent stage loops, ZMQ for headers and control, torch.distributed for tensors


class StageError(RuntimeError):
    """A stage failed, died or stopped answering; names the stage."""

    def __init__(self, index: int | None, message: str):
        where = f"stage {index + 1}" if index is not None else "pipeline"
        super().__init__(f"{where}: {message}")
        self.index = index


def _bind_inbox(ctx, host: str):
    import zmq

    sock = ctx.socket(zmq.PULL)
    port = sock.bind_to_random_port(f"tcp://{host}")
    return sock, f"tcp://{host}:{port}"


def _push(ctx, address: str):
    import zmq

    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.connect(address)
    return sock


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, master: str, backend: str, timeout_s: float = 120) -> None:
    """This process's place in the stages' torch.distributed group (rank = stage index)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


class StageLoop:
    """Runs one Stage behind the direct transport, in the stage's own process.

    A receiver thread reads the inbox: a rollback takes effect at once (so queued and
    running calls it makes stale are dropped), a hop's hidden state is received from the
    previous rank right after its header; work, hops and releases queue, in order, for the
    compute thread, which runs them and sends each result on: a Hop to the next stage, a
    Verdict, a StageReport or an error to the coordinator."""

    def __init__(self, stage, host: str):
        import zmq

        self.stage = stage
        self.ctx = zmq.Context()
        self.inbox, self.address = _bind_inbox(self.ctx, host)
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []

    def start(self, next_address: str, coordinator_address: str) -> None:
        self._next = _push(self.ctx, next_address)
        self._coordinator = (self._next if next_address == coordinator_address
                             else _push(self.ctx, coordinator_address))
        self._threads = [threading.Thread(target=self._receive, daemon=True, name="ppsd-receive"),
                         threading.Thread(target=self._compute, daemon=True, name="ppsd-compute")]
        for t in self._threads:
            t.start()

    def _receive(self) -> None:
        import torch.distributed as dist

        index = self.stage.index
        while True:
            msg = pickle.loads(self.inbox.recv())
            kind = msg[0]
            if kind == "rollback":
                self.stage.rollback(msg[1], msg[2])
            elif kind == "hop":
                _, entries, shape, dtype = msg
                hidden = torch.empty(shape, dtype=dtype, device=self.stage.device)
                dist.recv(hidden, src=index - 1)
                for (work, n, drafts, dists), part in zip(entries, hidden.split([e[1] for e in entries], dim=1)):
                    self._queue.put(("run", work, Hop(work, part, drafts, dists)))
            elif kind == "work":
                for work in msg[1]:
                    self._queue.put(("run", work, None))
            else:
                self._queue.put(msg)
                if kind == "stop":
                    return

    def _compute(self) -> None:
        import torch.distributed as dist

        index = self.stage.index
        while True:
            msg = self._queue.get()
            kind = msg[0]
            if kind == "stop":
                return
            try:
                if kind == "release":
                    _, seq_id, keep, events = msg
                    self._coordinator.send(pickle.dumps(("report", seq_id, index,
                                                         self.stage.release(seq_id, keep, events))))
                    continue
                _, work, hop = msg
                out = self.stage.forward(work, hop)
                if isinstance(out, Verdict):
                    self._coordinator.send(pickle.dumps(("verdict", out)))
                elif out is not None:
                    entries = [(out.work, out.hidden.shape[1], out.drafts, out.draft_dists)]
                    self._next.send(pickle.dumps(("hop", entries, tuple(out.hidden.shape), out.hidden.dtype)))
                    dist.send(out.hidden.contiguous(), dst=index + 1)
            except Exception as e:  # the coordinator fails the request and names this stage
                self._coordinator.send(pickle.dumps(("error", msg[1].seq_id if kind == "run" else msg[1],
                                                     index, f"{type(e).__name__}: {e}")))

    def stop(self) -> None:
        import zmq

        with self.ctx.socket(zmq.PUSH) as s:
            s.connect(self.address)
            s.send(pickle.dumps(("stop",)))
        for t in self._threads:
            t.join(timeout=5)


class DirectPipe:
    """The coordinator's side of the direct transport: Work to stage 1, control to every
    stage, Verdicts and StageReports back on its own inbox; each answer is a Future."""

    def __init__(self, host: str, timeout_s: float = 120.0):
        import zmq

        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.inbox, self.address = _bind_inbox(self.ctx, host)
        self._lock = threading.Lock()  # ZMQ sockets are not thread-safe; requests run on several threads
        self._verdicts: dict[tuple[str, int, int], Future] = {}
        self._reports: dict[tuple[str, int], Future] = {}
        self._failed: dict[str, StageError] = {}
        self._stages: list = []
        threading.Thread(target=self._receive, daemon=True, name="ppsd-verdicts").start()

    def connect(self, stage_addresses: Sequence[str]) -> None:
        self._stages = [_push(self.ctx, a) for a in stage_addresses]

    def _send(self, index: int, msg) -> None:
        data = pickle.dumps(msg)
        with self._lock:
            self._stages[index].send(data)

    def submit(self, work: Work) -> Future:
        fut: Future = Future()
        with self._lock:
            failed = self._failed.get(work.seq_id)
            self._verdicts[work.seq_id, work.epoch, work.pos] = fut
        if failed:
            fut.set_exception(failed)
        else:
            self._send(0, ("work", [work]))
        return fut

    def rollback(self, seq_id: str, epoch: int) -> None:
        for i in range(len(self._stages)):
            self._send(i, ("rollback", seq_id, epoch))
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
        for i in range(len(self._stages)):
            self._send(i, ("release", seq_id, keep, events))
        return futures

    def get(self, fut: Future):
        try:
            return fut.result(timeout=self.timeout_s)
        except TimeoutError:
            raise StageError(None, f"no answer within {self.timeout_s:.0f} s") from None

    def fail(self, error: StageError) -> None:
        """Every request waiting on the pipeline gets `error` (a stage died or hung)."""
        with self._lock:
            pending = list(self._verdicts.values()) + list(self._reports.values())
            for seq in {k[0] for k in self._verdicts}:
                self._failed[seq] = error
            self._verdicts.clear()
            self._reports.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(error)

    def _receive(self) -> None:
        while True:
            msg = pickle.loads(self.inbox.recv())
            kind = msg[0]
            with self._lock:
                if kind == "verdict":
                    v = msg[1]
                    fut = self._verdicts.pop((v.seq_id, v.epoch, v.pos), None)
                elif kind == "report":
                    fut = self._reports.pop((msg[1], msg[2]), None)
                else:  # an error: every answer this sequence waits for fails
                    _, seq_id, index, text = msg
                    error = StageError(index, text)
                    self._failed[seq_id] = error
                    futs = [self._verdicts.pop(k) for k in [k for k in self._verdicts if k[0] == seq_id]]
                    fut = None
            if kind == "verdict" or kind == "report":
                if fut is not None and not fut.done():
                    fut.set_result(msg[1] if kind == "verdict" else msg[3])
            else:
                for f in futs:
                    if not f.done():
                        f.set_exception(error)
