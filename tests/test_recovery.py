"""A stage process killed in the middle of a generation loses nothing: its actor restarts,
the coordinator repairs the pipeline, and the request goes on from its committed tokens to
the same output, on both transports."""
from __future__ import annotations

import os
import random
import signal

import pytest

from actors.pipeline import Pipeline
from conftest import hf_greedy
from ppsd_ray.config import GenerationConfig, PipelineConfig

PROMPT = [3, 5, 78, 7, 5, 195, 4, 3]


def kill_stage(pipe: Pipeline, index: int) -> int:
    import ray

    pid = ray.get(pipe.stages[index].ready.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def generate_with_kills(pipe: Pipeline, prompt, gen: GenerationConfig, kills: list[tuple[int, int]]):
    """Streams a generation, killing stage `index` after `after` tokens for each (after, index)."""
    plan = dict(kills)
    tokens, stats = [], None
    for item in pipe.stream(prompt, gen):
        if isinstance(item, dict):
            stats = item
            break
        tokens.append(item)
        if len(tokens) in plan:
            kill_stage(pipe, plan[len(tokens)])
    return tokens, stats


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["direct", "ray"])
def test_a_killed_stage_loses_no_token(ray_cluster, tiny_model_dir, transport):
    import ray

    rng = random.Random(transport)
    want = hf_greedy(tiny_model_dir, PROMPT, 48, stop_on_eos=False)
    with Pipeline(PipelineConfig(model_dir=tiny_model_dir, stages=3, transport=transport, timeout_s=60)) as pipe:
        for mode in ["ppsd", "eesd"]:
            victim = rng.randrange(3)
            before = ray.get(pipe.stages[victim].ready.remote())["pid"]
            tokens, stats = generate_with_kills(pipe, PROMPT, GenerationConfig(mode=mode, max_new_tokens=48,
                                                                               stop_on_eos=False),
                                                [(rng.randrange(4, 30), victim)])
            assert tokens == want, (mode, victim)
            assert stats["repairs"] >= 1 and stats["new_tokens"] == 48
            assert ray.get(pipe.stages[victim].ready.remote())["pid"] != before  # it really was a new process
        # the repaired pipeline serves the next request as if nothing happened, with nothing left behind
        assert pipe.generate(PROMPT, GenerationConfig(max_new_tokens=48, stop_on_eos=False)).token_ids == want
        assert ray.get([s.sequences.remote() for s in pipe.stages]) == [[]] * 3


@pytest.mark.slow
def test_a_stage_rebuilt_under_16_batched_sequences_loses_none(ray_cluster, tiny_model_dir):
    """16 requests decode together (their calls batched); stage 2 dies under them. Every one is
    re-prefilled from its committed tokens and ends with its uninterrupted output."""
    import threading
    import time

    import ray

    prompts = [[3 + i, 5, 78, 7, 5 + i, 195, 4, 3][: 2 + i % 7] for i in range(16)]
    gen = GenerationConfig(mode="ppsd", max_new_tokens=40, stop_on_eos=False)
    want = [hf_greedy(tiny_model_dir, p, 40, stop_on_eos=False) for p in prompts]
    with Pipeline(PipelineConfig(model_dir=tiny_model_dir, stages=2, timeout_s=60, max_num_seqs=16)) as pipe:
        got = []
        run = threading.Thread(target=lambda: got.extend(pipe.generate_many(prompts, gen)))
        run.start()
        deadline = time.monotonic() + 60
        while len(ray.get(pipe.stages[1].sequences.remote())) < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        kill_stage(pipe, 1)  # with every sequence held there
        run.join(120)
        assert [g.token_ids for g in got] == want
        assert all(g.stats["repairs"] >= 1 for g in got)
        assert ray.get([s.sequences.remote() for s in pipe.stages]) == [[]] * 2
