"""Continuous batching: many sequences' calls in one forward per stage step, each request's
tokens exactly its tokens alone. In-process: StageLoops and a DirectPipe over loopback TCP,
one decoding thread per request, as the Coordinator runs them."""
import threading

import pytest

from conftest import hf_greedy
from ppsd_ray.config import GenerationConfig
from ppsd_ray.schedule import Decoder, RequestStats
from test_schedule import local_stages
from test_transport import direct_pipe

# different lengths, so calls of different sequences sit at different positions in one forward
PROMPTS = [[3, 5, 78, 7, 5, 195, 4, 3], [1, 40, 41, 42], [9], [17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28],
           [100, 7], [33, 44, 55, 66, 77], [8, 9, 10], [201, 3, 3, 3, 3, 3, 3]]


def batch_sizes(stage) -> list[int]:
    """Records the number of calls in each of the stage's forwards."""
    sizes, forward_batch = [], stage.forward_batch

    def recording(calls):
        sizes.append(len(calls))
        return forward_batch(calls)

    stage.forward_batch = recording
    return sizes


def decode_together(decoder, requests, cancel_after: dict | None = None):
    """Each (prompt, GenerationConfig) on its own thread, all at once; a request in
    cancel_after stops taking tokens after that many (its caller went away)."""
    outs = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def one(i, prompt, gen):
        start.wait()
        got = []
        tokens = decoder.decode(f"s{i}", prompt, gen, RequestStats())
        for token in tokens:
            got.append(token)
            if cancel_after and len(got) == cancel_after.get(i):
                break
        tokens.close()
        outs[i] = got

    threads = [threading.Thread(target=one, args=(i, p, g)) for i, (p, g) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outs


@pytest.mark.parametrize("k", [1, 2, 3])
def test_batched_requests_equal_transformers_greedy_and_their_output_alone(tiny_model_dir, k):
    """Prompts enter in chunks of 3 tokens, mixed with other sequences' decoding, and a step
    computes at most 8 tokens, so long chunks wait for the next step."""
    stages = local_stages(tiny_model_dir, k)
    sizes = batch_sizes(stages[-1])
    pipe, loops = direct_pipe(stages, max_batch_tokens=8)
    decoder = Decoder(pipe, k, get=pipe.get, eos_token_ids=[2], prefill_chunk=3)
    modes = ["ar"] if k == 1 else ["pp", "ppsd", "eesd"]
    try:
        for mode in modes:
            # lengths differ, so sequences finish mid-batch while the others go on
            requests = [(p, GenerationConfig(mode=mode, max_new_tokens=12 + 3 * i, stop_on_eos=False, gamma=3))
                        for i, p in enumerate(PROMPTS)]
            got = decode_together(decoder, requests)
            for (prompt, gen), out in zip(requests, got):
                assert out == hf_greedy(tiny_model_dir, prompt, gen.max_new_tokens, stop_on_eos=False), (mode, prompt)
        assert max(sizes) > 1, "no forward held more than one call: nothing was batched"
        assert [loop.stage.sequences() for loop in loops] == [[]] * k
    finally:
        for loop in loops:
            loop.stop()


def test_batched_sampling_equals_sampling_alone_and_a_cancel_frees_its_slot(tiny_model_dir):
    """Seeded sampled requests give the tokens they give alone; a request cancelled mid-batch
    stops, the others go on unchanged, and no stage holds anything afterwards."""
    stages = local_stages(tiny_model_dir, 2)
    sizes = batch_sizes(stages[0])
    pipe, loops = direct_pipe(stages)
    decoder = Decoder(pipe, 2, get=pipe.get, eos_token_ids=[2])
    try:
        requests = [(p, GenerationConfig(mode=mode, max_new_tokens=20, temperature=0.9, top_p=0.95, seed=i,
                                         stop_on_eos=False))
                    for i, p in enumerate(PROMPTS[:6]) for mode in ["ppsd", "pp"]]
        alone = [decode_together(decoder, [r])[0] for r in requests]
        together = decode_together(decoder, requests, cancel_after={3: 5, 8: 2})
        for i, (a, t) in enumerate(zip(alone, together)):
            assert t == (a[:5] if i == 3 else a[:2] if i == 8 else a), i
        assert max(sizes) > 1
        assert [loop.stage.sequences() for loop in loops] == [[]] * 2
    finally:
        for loop in loops:
            loop.stop()


@pytest.mark.parametrize("shape", [(192, 64), (576, 576), (1536, 576)])
@pytest.mark.parametrize("sizes", [[1, 5, 2, 1, 1, 9, 3, 1, 1, 2, 17, 1], [1, 40, 3, 33, 1]])
@pytest.mark.parametrize("one_row", [False, True])
def test_tiled_linear_gives_each_call_its_result_alone(shape, sizes, one_row):
    """Small calls share tiles of the measured row counts (a short tile padded), a call longer
    than the largest tile gets a matmul of its own, and where the class runs on (open_to) a
    batch up to that many rows is one matmul: either way each call's rows are bit for bit
    what the call gets alone, in the layout the stage would store the weight in. one_row (a
    stage planned for one sequence): a lone row is F.linear's own 1-row product, bias too."""
    import torch

    from ppsd_ray.kv import batch_layout, call_rows, one_row_tiling, stored_transposed, tiled_linear

    torch.manual_seed(0)
    weight = torch.randn(*shape)
    bias = torch.randn(shape[0]) if one_row else None
    tiling = one_row_tiling(weight, bias) if one_row else batch_layout(weight, limit=16, open_to=64)
    weight = stored_transposed(weight) if tiling.transposed else weight
    x = torch.randn(1, sum(sizes), shape[1])
    with call_rows(sizes):
        together = tiled_linear(x, weight, bias, tiling).split(sizes, dim=1)
    for call, got in zip(x.split(sizes, dim=1), together):
        with call_rows([call.shape[1]]):
            assert torch.equal(tiled_linear(call, weight, bias, tiling), got)
            if one_row and call.shape[1] == 1:
                assert torch.equal(got, torch.nn.functional.linear(call, weight, bias))


def test_a_weight_is_stored_transposed_only_where_that_batches_in_fewer_tiles(monkeypatch):
    import torch

    from ppsd_ray import kv

    def classes(weight, limit=32, open_to=0):  # as measured on an Intel Xeon with two threads, 576x576
        return kv.Tiling(tuple(range(2, limit + 1)) if not weight.is_contiguous() else (2, 3))

    monkeypatch.setattr(kv, "invariant_tiling", classes)
    monkeypatch.setattr(kv, "packed_linear", lambda *a, **k: None)  # a CPU where oneDNN's order follows the rows
    linear = torch.nn.Linear(8, 4, bias=False)
    before = linear.weight.detach().clone()
    kv.batch_invariant(linear)
    assert linear.weight.stride() == (1, 4) and torch.equal(linear.weight, before)
    x = torch.randn(3, 8)
    assert torch.allclose(linear(x), x @ before.t(), atol=1e-6)

    monkeypatch.setattr(kv, "invariant_tiling", lambda weight, limit=32, open_to=0: kv.Tiling(tuple(range(4, limit + 1))))
    linear = kv.batch_invariant(torch.nn.Linear(8, 4, bias=False))
    assert linear.weight.is_contiguous()


@pytest.mark.parametrize("packed", [True, False])
def test_a_stages_linears_give_each_call_its_result_alone(monkeypatch, packed):
    """batch_invariant's kernel, oneDNN's packed one where its probe holds on this CPU or the
    measured tiles (forced with packed=False): calls of 1 to 40 rows, and a prompt-sized one,
    together in one batch give each call's rows bit for bit what the call gets alone."""
    import torch

    from ppsd_ray import kv

    if not packed:
        monkeypatch.setattr(kv, "packed_linear", lambda *a, **k: None)
    torch.manual_seed(0)
    sizes = [1, 5, 2, 1, 9, 40, 1, 3, 130, 1]
    for shape in [(192, 64), (96, 1536)]:
        linear = torch.nn.Linear(shape[1], shape[0])
        weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()  # a tiled one may transpose
        kv.batch_invariant(linear)
        x = torch.randn(1, sum(sizes), shape[1])
        with torch.inference_mode(), kv.call_rows(sizes):
            together = linear(x).split(sizes, dim=1)
        for call, got in zip(x.split(sizes, dim=1), together):
            with torch.inference_mode(), kv.call_rows([call.shape[1]]):
                assert torch.equal(linear(call), got)
            assert torch.allclose(got, torch.nn.functional.linear(call, weight, bias), atol=1e-5)


def test_packed_linear_is_the_linear_cut_along_its_inner_dimension_and_its_probe_refuses_a_row_dependent_order(
        monkeypatch):
    import torch

    from ppsd_ray import kv

    torch.manual_seed(0)
    weight, bias = torch.randn(48, 1536), torch.randn(48)
    kernel = kv.PackedLinear(weight, rows=8)
    assert kernel.cuts == [768, 768]  # at most MAX_PACKED_K each
    x = torch.randn(2, 11, 1536)  # more rows than `rows`: in pieces
    assert torch.allclose(kernel(x, bias), torch.nn.functional.linear(x, weight, bias), atol=1e-4)

    product = kv.PackedLinear.product  # a kernel whose low bits follow the row count, as MKL's do
    monkeypatch.setattr(kv.PackedLinear, "product",
                        lambda self, rows, b: product(self, rows, b) * (1 + 1e-7 * (len(rows) > 3)))
    assert kv.packed_linear(weight, bias, limit=4) is None


def test_tiling_pads_to_a_measured_count_and_splits_into_near_equal_tiles():
    from ppsd_ray.kv import Tiling

    large = Tiling((4, 8, *range(12, 33)))  # as measured with two threads on AMD EPYC
    assert [large.pad(n) for n in (1, 4, 5, 9, 12, 32)] == [4, 4, 8, 12, 12, 32]
    assert large.split(16) == [16] and large.split(40) == [20, 20] and large.split(65) == [22, 22, 21]
    pairs = Tiling((2, 3))  # the class of 2 rows ends at 3 (576x576 with two threads on Intel)
    assert pairs.pad(1) == 2 and pairs.split(5) == [3, 2] and pairs.split(7) == [3, 2, 2]
    assert Tiling((1,)).split(3) == [1, 1, 1]
