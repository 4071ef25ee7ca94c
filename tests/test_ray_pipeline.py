"""The pipeline on real Ray actors, on both transports: lossless in every mode, streamed,
stats filled, requests kept apart, and no sequence state left behind."""
import threading

import pytest
import ray

from actors.pipeline import GenerationError, Pipeline
from conftest import hf_greedy
from ppsd_ray.config import GenerationConfig, PipelineConfig

PROMPT = [3, 5, 78, 7, 5, 195, 4, 3]


TRANSPORTS = ["direct", "ray"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_ray_pipeline_equals_transformers_greedy(ray_cluster, tiny_model_dir, k, transport):
    import ray

    want = hf_greedy(tiny_model_dir, PROMPT, 40, stop_on_eos=False)
    config = PipelineConfig(model_dir=tiny_model_dir, stages=k, transport=transport)  # exit layer auto
    with Pipeline(config) as pipe:
        assert [s["layers"] for s in pipe.layout] == [list(r) for r in pipe.plan.layer_ranges]
        for mode in ["pp", "ppsd", "eesd"]:
            result = pipe.generate(PROMPT, GenerationConfig(mode=mode, max_new_tokens=40, stop_on_eos=False))
            assert result.token_ids == want, mode
            stats = result.stats
            assert stats["new_tokens"] == 40 and stats["tokens_per_s"] > 0
            assert len(stats["stage_compute_s"]) == k and all(t > 0 for t in stats["stage_compute_s"])
            if mode != "pp":
                assert stats["accepted"] < stats["drafted"] and stats["rollbacks"] > 0
                assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]
                assert k > 2 or stats["accepted"] > 0  # a 2-layer exit of a random model rarely agrees
        assert ray.get([s.sequences.remote() for s in pipe.stages]) == [[]] * k  # all released


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ar_pipeline_and_stream(ray_cluster, tiny_model_dir, transport):
    want = hf_greedy(tiny_model_dir, PROMPT, 20)
    with Pipeline(PipelineConfig(model_dir=tiny_model_dir, stages=1, transport=transport)) as pipe:
        items = list(pipe.stream(PROMPT, GenerationConfig(mode="ar", max_new_tokens=20)))
    assert items[:-1] == want and isinstance(items[-1], dict)
    assert items[-1]["drafted"] == 0


def test_one_stage_for_one_sequence_runs_in_this_process(tiny_model_dir, monkeypatch):
    """No Ray: the stage and the token loop run in the caller's process, on its threads as planned,
    with transformers' output and the same stats; a stream closed early releases its sequence."""
    import torch

    monkeypatch.setattr("actors.pipeline.start_ray", lambda: pytest.fail("started Ray"))
    want = hf_greedy(tiny_model_dir, PROMPT, 20, stop_on_eos=False)
    threads = torch.get_num_threads()
    gen = GenerationConfig(mode="ar", max_new_tokens=20, stop_on_eos=False)
    config = PipelineConfig(model_dir=tiny_model_dir, stages=1, max_num_seqs=1, threads_per_stage=1)
    with Pipeline(config) as pipe:
        assert pipe.plan.in_process and "in this process" in pipe.plan.describe()
        items = list(pipe.stream(PROMPT, gen))
        assert items[:-1] == want and items[-1]["new_tokens"] == 20 and len(items[-1]["stages"]) == 1
        assert torch.get_num_threads() == threads  # the caller's own work keeps its threads
        stream = pipe.stream(PROMPT, GenerationConfig(max_new_tokens=20))  # auto: the plan's mode
        assert next(stream) == want[0]
        stream.close()
        assert pipe.local.stage.sequences() == []
        other = [1, 40, 41, 42, 43]
        streams = [pipe.stream(PROMPT, gen), pipe.stream(other, gen)]  # two at once, on one thread
        outs = [[], []]
        for _ in range(21):
            for out, s in zip(outs, streams):
                out.append(next(s))
        assert outs[0][:-1] == want and outs[1][:-1] == hf_greedy(tiny_model_dir, other, 20, stop_on_eos=False)
        done = []
        results = pipe.generate_many([PROMPT, PROMPT[:5]], gen, on_done=lambda i, r: done.append(i))
        assert results[0].token_ids == want and done == [0, 1]
        with pytest.raises(GenerationError, match="ppsd needs at least 2 stages"):
            pipe.generate(PROMPT, GenerationConfig(mode="ppsd"))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_requests_sharing_a_pipeline_do_not_mix(ray_cluster, tiny_model_dir, transport):
    """Two requests at once on the same stages: per-sequence caches and epochs keep them apart."""
    import ray

    prompts = [PROMPT, [1, 40, 41, 42, 43]]
    wants = [hf_greedy(tiny_model_dir, p, 30, stop_on_eos=False) for p in prompts]
    gen = GenerationConfig(mode="ppsd", max_new_tokens=30, stop_on_eos=False).model_dump()
    with Pipeline(PipelineConfig(model_dir=tiny_model_dir, stages=2, transport=transport)) as pipe:
        streams = [pipe.coordinator.generate.remote(f"seq{i}", p, gen) for i, p in enumerate(prompts)]
        outs = [[ray.get(r) for r in s][:-1] for s in streams]
    assert outs == wants


def test_admission_queues_requests_beyond_max_num_seqs(ray_cluster, tiny_model_dir):
    """Six requests on a pipeline that decodes two at a time: the others wait for a slot, and
    each answer equals transformers' greedy output."""
    prompts = [[3, 5, 78, 7], [1, 40, 41, 42], [9], [17, 18, 19], [100, 7], [8, 9, 10]]
    gen = GenerationConfig(mode="ppsd", max_new_tokens=16, stop_on_eos=False)
    with Pipeline(PipelineConfig(model_dir=tiny_model_dir, stages=2, max_num_seqs=2)) as pipe:
        held, done = [], threading.Event()

        def watch():  # how many sequences stage 1 holds at once
            while not done.is_set():
                held.append(len(ray.get(pipe.stages[0].sequences.remote())))

        watcher = threading.Thread(target=watch)
        watcher.start()
        got = pipe.generate_many(prompts, gen)
        done.set()
        watcher.join()
    assert max(held) == 2
    assert [g.token_ids for g in got] == [hf_greedy(tiny_model_dir, p, 16, stop_on_eos=False) for p in prompts]


def test_streams_share_one_feed_and_closing_one_cancels_only_it(ray_cluster, tiny_model_dir):
    """Three streams of one Pipeline at once, all through its one feed: the one closed after 3
    tokens is cancelled (within a second of the others ending no stage holds it; uncancelled, its
    500 tokens would take seconds more), the others end equal to transformers."""
    import time

    prompts = [PROMPT, [1, 40, 41, 42, 43], [9, 8, 7]]
    gen = GenerationConfig(mode="ppsd", max_new_tokens=24, stop_on_eos=False)
    with Pipeline(PipelineConfig(model_dir=tiny_model_dir, stages=2)) as pipe:
        closed = pipe.stream([17, 18, 19], GenerationConfig(mode="ppsd", max_new_tokens=500, stop_on_eos=False))
        streams = [pipe.stream(p, gen) for p in prompts]
        first = [next(closed) for _ in range(3)]
        closed.close()
        outs = [list(s) for s in streams]
        assert [o[:-1] for o in outs] == [hf_greedy(tiny_model_dir, p, 24, stop_on_eos=False) for p in prompts]
        assert all(isinstance(o[-1], dict) for o in outs)
        assert first == hf_greedy(tiny_model_dir, [17, 18, 19], 3, stop_on_eos=False)
        deadline = time.monotonic() + 1.0
        while any(ray.get([s.sequences.remote() for s in pipe.stages])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.get([s.sequences.remote() for s in pipe.stages]) == [[], []]
