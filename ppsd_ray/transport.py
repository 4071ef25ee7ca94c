"""How hidden states move from stage to stage: the one transport boundary.

Every transport carries the same messages (ppsd_ray.protocol) and offers the
Decoder the same Pipe (submit, rollback, release):

- LocalPipe: the stages in this process, called in turn (tests, the reference).
- direct: each stage runs a persistent loop (StageLoop) in its own process. Headers
  and control messages go over ZMQ sockets (PUSH to the next stage's PULL inbox).
  A CPU hidden state (a few KB per token) rides in the same message as a second
  frame: one send, no second channel to wait on. Between GPUs it goes by NCCL
  point-to-point in a torch.distributed group the loops own (gloo works too, for
  tests of that path on CPU). The coordinator's DirectPipe sends Work to stage 1
  and control to every stage, and receives Verdicts and StageReports from the last
  stage on its own inbox. Per token there is no Ray call and no object ref: Ray only
  places the processes and starts the loops (actors.stage).
- ray: one actor call per stage per call, hidden states as object refs (actors.stage.RayPipe).

A direct message is a list of Work headers (one per sequence in the call), so several
sequences can later share a forward without a new protocol.
"""
from __future__ import annotations

import pickle
import socket
import threading
from collections import deque
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
    """Runs one Stage behind the direct transport, in the stage's own process, on one thread.

    The loop reads its inbox in order: work and hops queue for the stage, a rollback takes
    effect at once, so queued calls it makes stale are skipped. While a call computes, the
    stage drains the inbox between layers (Stage.between_layers), so a rollback also stops
    the running call; no message waits for a thread hand-off. A hop's hidden state comes as
    the message's second frame, or, with a tensor group (NCCL between GPUs), from the
    previous rank right after its header. Each result goes on: a Hop to the next stage, a
    Verdict, a StageReport or an error to the coordinator. A failure of the transport itself
    (a peer died) ends the loop after telling the coordinator; the pipeline then rebuilds it."""

    def __init__(self, stage, host: str):
        import zmq

        self.stage = stage
        self.ctx = zmq.Context()
        self.inbox, self.address = _bind_inbox(self.ctx, host)
        self.group: TensorGroup | None = None
        self._pending: deque = deque()
        self._thread: threading.Thread | None = None

    def start(self, next_address: str, coordinator_address: str) -> None:
        self._next = _push(self.ctx, next_address)
        self._coordinator = (self._next if next_address == coordinator_address
                             else _push(self.ctx, coordinator_address))
        self.stage.between_layers = self._drain
        self._thread = threading.Thread(target=self._run, daemon=True, name="ppsd-stage")
        self._thread.start()

    def _run(self) -> None:
        index = self.stage.index
        while True:
            try:
                if not self._pending:
                    self._read(self.inbox.recv_multipart())
                self._drain()
            except Exception as e:  # the transport broke (a peer died): this loop is over
                self._send_coordinator(("error", None, index, f"receiving: {type(e).__name__}: {e}"))
                return
            if not self._pending:
                continue
            msg = self._pending.popleft()
            if msg[0] == "stop":
                return
            try:
                self._handle(msg)
            except Exception as e:  # the coordinator fails the request and names this stage
                seq_id = msg[1].seq_id if msg[0] == "run" else msg[1]
                self._send_coordinator(("error", seq_id, index, f"{type(e).__name__}: {e}"))

    def _drain(self) -> None:
        import zmq

        while self.inbox.poll(0, zmq.POLLIN):
            self._read(self.inbox.recv_multipart())

    def _read(self, frames: list[bytes]) -> None:
        msg = pickle.loads(frames[0])
        kind = msg[0]
        if kind == "rollback":
            self.stage.rollback(msg[1], msg[2])
        elif kind == "hop":
            _, entries, shape, dtype = msg
            if self.group is None:
                hidden = torch.frombuffer(bytearray(frames[1]), dtype=dtype).reshape(shape)
            else:
                hidden = torch.empty(shape, dtype=dtype, device=self.stage.device)
                self.group.recv(hidden, src=self.stage.index - 1)
            for (work, n, drafts, dists), part in zip(entries, hidden.split([e[1] for e in entries], dim=1)):
                self._pending.append(("run", work, Hop(work, part, drafts, dists)))
        elif kind == "work":
            self._pending.extend(("run", work, None) for work in msg[1])
        else:  # release, stop
            self._pending.append(msg)

    def _handle(self, msg) -> None:
        if msg[0] == "release":
            _, seq_id, keep, events = msg
            self._send_coordinator(("report", seq_id, self.stage.index, self.stage.release(seq_id, keep, events)))
            return
        _, work, hop = msg
        out = self.stage.forward(work, hop)
        if isinstance(out, Verdict):
            self._send_coordinator(("verdict", out))
        elif out is not None:
            hidden = out.hidden.contiguous()
            header = pickle.dumps(("hop", [(out.work, hidden.shape[1], out.drafts, out.draft_dists)],
                                   tuple(hidden.shape), hidden.dtype))
            if self.group is None:
                self._next.send_multipart([header, hidden.view(torch.uint8).numpy()])
            else:
                self._next.send(header)
                self.group.send(hidden, dst=self.stage.index + 1)

    def _send_coordinator(self, msg) -> None:
        self._coordinator.send(pickle.dumps(msg))

    def stop(self) -> None:
        """Ends the loop (a thread stuck on a dead peer is left behind as a daemon)."""
        import zmq

        with self.ctx.socket(zmq.PUSH) as s:
            s.setsockopt(zmq.LINGER, 1000)
            s.connect(self.address)
            s.send(pickle.dumps(("stop",)))
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.stage.between_layers = None
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
