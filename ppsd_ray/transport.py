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
    """A stage failed, died or stopped answering; names the stage (1-based in the message)."""

    def __init__(self, index: int | None, message: str):
        where = f"stage {index + 1}" if index is not None else "pipeline"
        super().__init__(f"{where}: {message}")
        self.index = index

    def __reduce__(self):  # crosses Ray with its stage
        return type(self), (self.index, str(self).split(": ", 1)[1])


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


class StageLoop:
    """Runs one Stage behind the direct transport, in the stage's own process.

    A receiver thread reads the inbox: a rollback takes effect at once (so queued and
    running calls it makes stale are dropped), a hop's hidden state is received from the
    previous rank right after its header; work, hops and releases queue, in order, for the
    compute thread, which runs them and sends each result on: a Hop to the next stage, a
    Verdict, a StageReport or an error to the coordinator. A failure of the transport itself
    (a peer died) ends the loop after telling the coordinator; the pipeline then rebuilds it."""

    def __init__(self, stage, host: str):
        import zmq

        _prompt_thread_switches()
        self.stage = stage
        self.ctx = zmq.Context()
        self.inbox, self.address = _bind_inbox(self.ctx, host)
        self.group: TensorGroup | None = None
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
        index = self.stage.index
        try:
            while True:
                msg = pickle.loads(self.inbox.recv())
                kind = msg[0]
                if kind == "rollback":
                    self.stage.rollback(msg[1], msg[2])
                elif kind == "hop":
                    _, entries, shape, dtype = msg
                    hidden = torch.empty(shape, dtype=dtype, device=self.stage.device)
                    self.group.recv(hidden, src=index - 1)
                    for (work, n, drafts, dists), part in zip(entries, hidden.split([e[1] for e in entries], dim=1)):
                        self._queue.put(("run", work, Hop(work, part, drafts, dists)))
                elif kind == "work":
                    for work in msg[1]:
                        self._queue.put(("run", work, None))
                elif kind == "stop":
                    return
                else:
                    self._queue.put(msg)
        except Exception as e:  # the transport broke (a peer died): this loop is over
            self._queue.put(("broken", f"receiving: {type(e).__name__}: {e}"))
        finally:
            self._queue.put(("stop",))

    def _compute(self) -> None:
        index = self.stage.index
        while True:
            msg = self._queue.get()
            kind = msg[0]
            if kind == "stop":
                return
            try:
                if kind == "broken":
                    self._coordinator.send(pickle.dumps(("error", None, index, msg[1])))
                elif kind == "release":
                    _, seq_id, keep, events = msg
                    self._coordinator.send(pickle.dumps(("report", seq_id, index,
                                                         self.stage.release(seq_id, keep, events))))
                else:
                    _, work, hop = msg
                    out = self.stage.forward(work, hop)
                    if isinstance(out, Verdict):
                        self._coordinator.send(pickle.dumps(("verdict", out)))
                    elif out is not None:
                        entries = [(out.work, out.hidden.shape[1], out.drafts, out.draft_dists)]
                        self._next.send(pickle.dumps(("hop", entries, tuple(out.hidden.shape), out.hidden.dtype)))
                        self.group.send(out.hidden.contiguous(), dst=index + 1)
            except Exception as e:  # the coordinator fails the request and names this stage
                seq_id = msg[1].seq_id if kind == "run" else msg[1] if kind == "release" else None
                self._coordinator.send(pickle.dumps(("error", seq_id, index, f"{type(e).__name__}: {e}")))

    def stop(self) -> None:
        """Ends both threads (a thread stuck on a dead peer is left behind as a daemon)."""
        import zmq

        with self.ctx.socket(zmq.PUSH) as s:
            s.setsockopt(zmq.LINGER, 1000)
            s.connect(self.address)
            s.send(pickle.dumps(("stop",)))
        for t in self._threads:
            t.join(timeout=5)
        self.ctx.destroy(linger=0)


class DirectPipe:
    """The coordinator's side of the direct transport: Work to stage 1, control to every
    stage, Verdicts and StageReports back on its own inbox; each answer is a Future."""

    def __init__(self, host: str, timeout_s: float = 120.0):
        import zmq

        _prompt_thread_switches()
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
        """To every stage's inbox (again, after a rebuild)."""
        with self._lock:
            for sock in self._stages:
                sock.close(linger=0)
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
            msg = pickle.loads(self.inbox.recv())
            kind = msg[0]
            with self._lock:
                if kind == "verdict":
                    v = msg[1]
                    fut = self._verdicts.pop((v.seq_id, v.epoch, v.pos), None)
                elif kind == "report":
                    fut = self._reports.pop((msg[1], msg[2]), None)
                else:  # an error: every answer this sequence waits for fails (all of them: the transport's)
                    _, seq_id, index, text = msg
                    error = StageError(index, text)
                    fut = None
            if kind == "verdict" or kind == "report":
                if fut is not None and not fut.done():
                    fut.set_result(msg[1] if kind == "verdict" else msg[3])
            else:
                self.fail(error, seq_id)
