"""The direct transport without Ray: StageLoops and a DirectPipe in this process, talking
over TCP on loopback exactly as they do between stage processes."""
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from conftest import free_ports, hf_greedy
from ppsd_ray.config import GenerationConfig
from ppsd_ray.protocol import Sampling, Work
from ppsd_ray.schedule import Decoder, RequestStats
from ppsd_ray.stage import Stage
from ppsd_ray.transport import DirectPipe, Inbox, LocalPipe, Outbox, StageError, StageLoop, TensorGroup
from test_schedule import PROMPTS, local_stages

HOST = "127.0.0.1"


def direct_pipe(stages, tensor_group: str | None = None, max_batch_tokens: int = 512):
    """What the Coordinator sets up through Ray (actors.coordinator._connect_direct)."""
    pipe = DirectPipe(HOST, timeout_s=30)
    loops = [StageLoop(stage, HOST, max_batch_tokens) for stage in stages]
    if tensor_group:
        master = f"{HOST}:{free_ports(1)[0]}"

        def join(loop):  # every rank joins at once
            loop.group = TensorGroup(loop.stage.index, len(loops), master, tensor_group)

        joins = [threading.Thread(target=join, args=(loop,)) for loop in loops]
        for t in joins:
            t.start()
        for t in joins:
            t.join()
    addresses = [loop.address for loop in loops]
    for loop in loops:
        loop.start(addresses, pipe.address)
    pipe.connect(addresses)
    return pipe, loops


@pytest.mark.parametrize("tensor_group", [None, "gloo"])
def test_direct_transport_equals_transformers_greedy(tiny_model_dir, tensor_group):
    pipe, loops = direct_pipe(local_stages(tiny_model_dir, 3), tensor_group)
    decoder = Decoder(pipe, 3, get=pipe.get)
    try:
        for prompt in PROMPTS[:2]:
            want = hf_greedy(tiny_model_dir, prompt, 24, stop_on_eos=False)
            for mode in ["pp", "ppsd", "eesd"]:
                stats = RequestStats()
                out = list(decoder.decode("s", prompt, GenerationConfig(mode=mode, max_new_tokens=24,
                                                                        stop_on_eos=False), stats))
                assert out == want, (mode, prompt)
                assert [s.index for s in stats.stages] == [0, 1, 2]
        assert [loop.stage.sequences() for loop in loops] == [[]] * 3
    finally:
        for loop in loops:
            loop.stop()


def test_a_rollback_reaches_a_running_call_between_layers(tiny_model_dir):
    """The loop has one thread: the rollback arrives on the inbox while stage 1 computes,
    and the stage's drain between layers applies it, so the call stops there."""
    first, last = local_stages(tiny_model_dir, 2)
    pipe, loops = direct_pipe([first, last])
    ran = []

    def slow_layer_one(module, args):  # the rollback lands while layer 0 runs
        ran.append(module)
        if len(ran) == 1:
            pipe.rollback("s", 1)
            time.sleep(0.2)

    try:
        assert pipe.get(pipe.submit(Work("s", 0, 0, (5, 6, 7)))).tokens
        first.body.layers[0].register_forward_pre_hook(slow_layer_one)
        stopped = pipe.submit(Work("s", 0, 3, (8,)))
        deadline = time.monotonic() + 10
        while not ran and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # the drain at layer 1 has run
        assert ran == [first.body.layers[0]]  # layers 1..3 never ran
        assert not stopped.done()  # a stale call has no answer
        reports = [pipe.get(f) for f in pipe.release("s", keep=3)]
        assert reports[0].skipped == 1 and reports[0].stale_s > 0 and reports[1].calls == 1
    finally:
        for loop in loops:
            loop.stop()


@pytest.mark.parametrize("k", [1, 2])
def test_a_pp_call_waits_at_stage_one_for_the_token_the_last_stage_feeds_it(tiny_model_dir, k):
    """The call at p + 1 is sent with no tokens before p has run; it runs on the token the last
    stage commits at p, fed straight to stage 1 (with one stage: to itself). A call whose token
    never comes waits, and the rollback that ends its request skips it."""
    stages = local_stages(tiny_model_dir, k)
    local = LocalPipe(stages)
    want = [local.submit(Work("s", 0, 0, (5, 6, 7))).tokens[0]]
    want += local.submit(Work("s", 0, 3, (want[0],), feed=True)).tokens
    want += local.submit(Work("s", 0, 4, None)).tokens
    local.release("s", keep=0)
    pipe, loops = direct_pipe(stages)
    try:
        assert pipe.get(pipe.submit(Work("s", 0, 0, (5, 6, 7)))).tokens == want[:1]
        fed = pipe.submit(Work("s", 0, 3, (want[0],), feed=True))
        ahead = pipe.submit(Work("s", 0, 4, None))
        assert pipe.get(ahead).tokens == want[2:] and pipe.get(fed).tokens == want[1:2]
        stranded = pipe.submit(Work("s", 0, 5, None))  # no call before it feeds stage 1
        time.sleep(0.3)
        assert not stranded.done() and list(loops[0]._waiting) == [("s", 5)]
        pipe.rollback("s", 1)
        reports = [pipe.get(f) for f in pipe.release("s", keep=5)]
        assert reports[0].skipped == 1 and reports[0].calls == 3
        assert not loops[0]._waiting and not loops[0]._fed
        assert [loop.stage.sequences() for loop in loops] == [[]] * k
    finally:
        for loop in loops:
            loop.stop()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_hidden_state_travels_bit_exact(tiny_model_dir, dtype):
    """In the message or by the gloo group, the last stage sees the very bytes stage 1 made:
    its logprobs equal those of the stages called in-process."""
    stages = [Stage(tiny_model_dir, 0, 4, index=0, num_stages=2, dtype=dtype),
              Stage(tiny_model_dir, 4, 8, index=1, num_stages=2, dtype=dtype)]
    work = Work("s", 0, 0, (5, 6, 7, 8), sampling=Sampling(logprobs=3))
    want = LocalPipe(stages).submit(work)
    for stage in stages:
        stage.release("s", keep=0)
    for group in [None, "gloo"]:
        pipe, loops = direct_pipe(stages, group)
        try:
            got = pipe.get(pipe.submit(work))
            [pipe.get(f) for f in pipe.release("s", keep=0)]
        finally:
            for loop in loops:
                loop.stop()
        assert got.tokens == want.tokens and got.logprobs == want.logprobs, group


def test_a_message_larger_than_a_socket_buffer_arrives_whole():
    """A long prompt's prefill hidden state is megabytes: it arrives complete and in order."""
    inbox = Inbox(HOST)
    payload = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB
    outbox = Outbox(inbox.address)
    sender = threading.Thread(target=lambda: [outbox.send(("part", i), payload.numpy()) for i in range(2)])
    sender.start()
    try:
        for i in range(2):
            msg, got = inbox.recv(timeout=30)
            assert msg == ("part", i)
            assert torch.equal(torch.frombuffer(got, dtype=torch.float32), payload)
    finally:
        sender.join()
        outbox.close()
        inbox.close()


def test_a_stage_that_dies_fails_its_requests_at_once_naming_it(tiny_model_dir):
    """The coordinator knows each stage loop by its connection. A loop stopped on purpose says
    goodbye and fails nothing; when the last stage's process goes (its sockets close with no
    goodbye), the waiting request fails within a second, naming stage 2, long before the
    pipe's 30 s timeout."""
    first, last = local_stages(tiny_model_dir, 2)
    pipe, loops = direct_pipe([first, last])
    hold = threading.Event()
    last.body.layers[0].register_forward_pre_hook(lambda module, args: hold.wait(10))
    try:
        waiting = pipe.submit(Work("s", 0, 0, (5, 6, 7)))
        time.sleep(0.2)
        loops[0].stop()
        time.sleep(0.5)
        assert not waiting.done()
        loops[1]._coordinator.sock.close()  # what a killed process leaves behind
        t0 = time.monotonic()
        with pytest.raises(StageError, match="stage 2: died"):
            pipe.get(waiting)
        assert time.monotonic() - t0 < 1.0
    finally:
        hold.set()
        loops[1].stop()


def test_a_request_queued_behind_others_waits_while_the_stages_answer():
    """The answer timeout counts silence of the whole pipeline, not one request's wait: with 32
    long prompts prefilling, the last request's first answer comes after everyone's chunks."""
    pipe = DirectPipe("127.0.0.1", timeout_s=0.6)
    others = Outbox(pipe.address)  # stands in for the last stage answering other sequences
    fut = Future()

    def answer_others_then_this():
        for _ in range(8):  # 1.6 s of answers to other sequences, longer than the timeout
            others.send(("verdicts", []))
            time.sleep(0.2)
        fut.set_result("the verdict")

    threading.Thread(target=answer_others_then_this).start()
    assert pipe.get(fut) == "the verdict"
    silent = Future()
    t0 = time.perf_counter()
    with pytest.raises(StageError, match="no answer within"):
        pipe.get(silent)
    assert 0.5 < time.perf_counter() - t0 < 2
    others.close()


def test_a_step_takes_the_running_streams_first_then_prompt_chunks_oldest_first():
    class Ready:  # every call can run
        def waits(self, work):
            return False

    loop = StageLoop(Ready(), "127.0.0.1", max_batch_tokens=300)
    try:
        chunks = [("run", Work(f"new{i}", 0, c * 128, (5,) * 128, verify=0), None) for i in range(3) for c in range(2)]
        decode = [("run", Work(f"old{i}", 0, 40, (7,)), None) for i in range(3)]
        loop._pending.extend(chunks + decode)
        first = [(w.seq_id, w.pos) for _, w, _ in loop._next_batch()]
        # the three decode tokens, then the oldest prompt's first chunk and the next prompt's first
        assert first == [("new0", 0), ("new1", 0), ("old0", 40), ("old1", 40), ("old2", 40)]
        rest = [(w.seq_id, w.pos) for _, w, _ in loop._pending]
        assert rest == [("new0", 128), ("new1", 128), ("new2", 0), ("new2", 128)]  # in their order
    finally:
        loop.inbox.close()
