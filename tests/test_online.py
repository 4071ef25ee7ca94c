"""Online learning of the exit head (ppsd_ray/online.py): stage 1 records the committed
positions, a learner installs only better heads, versions persist, and no swap ever
changes what the pipeline outputs."""
import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.pipeline import Pipeline
from actors.serve import check_settings
from conftest import build_tiny_model, hf_greedy
from ppsd_ray.cli import main
from ppsd_ray.config import GenerationConfig, LearnConfig, Mode, PipelineConfig
from ppsd_ray.distill import new_head
from ppsd_ray.heads import HeadMismatch, check_head_meta, read_head_meta, save_head
from ppsd_ray.model import model_fingerprint
from ppsd_ray.online import HeadStore, OnlineLearner, TrafficBuffer, agreement, starting_head
from ppsd_ray.plan import candidates, resolve
from ppsd_ray.schedule import Decoder, RequestStats
from ppsd_ray.transport import LocalPipe
from test_schedule import local_stages

PROMPT = [3, 5, 78, 7, 5, 195, 4, 3]
EXIT = 4  # the tiny model's 8 layers on 2 stages


def random_linear_head(model_dir, path, seed=1, scale=0.5):
    """A linear head for the tiny model, far from the 'lm' head, saved as a head file."""
    head = new_head("linear", model_dir, EXIT)
    torch.manual_seed(seed)
    with torch.no_grad():
        head.proj.weight.normal_(0, scale / head.proj.weight.shape[0] ** 0.5)
    save_head(head, path, {"model_fingerprint": model_fingerprint(model_dir)})
    return path


def learning_stages(model_dir, learn_positions=4096):
    stages = local_stages(model_dir, 2, EXIT)
    stages[0].learn_positions = learn_positions
    return stages


def decode(decoder, seq_id, swap_after=None, swap=None, **gen):
    """The request's tokens and stats; swap() runs once swap_after tokens have come."""
    stats = RequestStats()
    out = []
    for token in decoder.decode(seq_id, PROMPT, GenerationConfig(stop_on_eos=False, **gen), stats):
        out.append(token)
        if len(out) == swap_after:
            swap()
    return out, stats


# ---------------------------------------------------------------- (a) lossless through a swap


@pytest.mark.parametrize("mode", ["ppsd", "eesd"])
def test_a_swap_in_the_middle_of_a_stream_changes_no_token(tiny_model_dir, tmp_path, mode):
    """Greedy: equal to transformers' output and to the run without a swap. Seeded sampling:
    equal to the same seeded stream without the swap, since the stream keeps drafting with the
    version it started with; the next request drafts with the new one."""
    head = random_linear_head(tiny_model_dir, tmp_path / "v1.safetensors")
    want = hf_greedy(tiny_model_dir, PROMPT, 16, stop_on_eos=False)
    sampled = dict(mode=mode, max_new_tokens=16, temperature=0.8, top_p=0.95, seed=7)
    plain = Decoder(LocalPipe(local_stages(tiny_model_dir, 2, EXIT)), 2)
    alone_sampled, _ = decode(plain, "s", **sampled)
    for gen in (dict(mode=mode, max_new_tokens=16), sampled):
        stages = local_stages(tiny_model_dir, 2, EXIT)
        decoder = Decoder(LocalPipe(stages), 2)
        got, stats = decode(decoder, "a", swap_after=6, swap=lambda: stages[0].install_head(1, str(head)), **gen)
        assert got == (want if "temperature" not in gen else alone_sampled)
        assert stats.head_version == 0 and stats.drafted > 0
        assert list(stages[0]._heads) == [1]  # version 0 dropped once its last sequence ended
        after, stats = decode(decoder, "b", **gen)
        assert stats.head_version == 1
        # greedy: the new head changes nothing; sampled: it changes the draws, which is why a
        # running stream keeps the version it started with
        assert after == want if "temperature" not in gen else after != alone_sampled
    assert stages[0].sequences() == []


def test_sequences_running_together_each_keep_their_version(tiny_model_dir, tmp_path):
    """Two streams interleaved on one pipeline, a swap between them: each drafts with the version
    it started with (they share stage steps, so the heads are grouped per version)."""
    head = random_linear_head(tiny_model_dir, tmp_path / "v1.safetensors")
    stages = local_stages(tiny_model_dir, 2, EXIT)
    decoder = Decoder(LocalPipe(stages), 2)
    gen = GenerationConfig(mode="ppsd", max_new_tokens=20, stop_on_eos=False, temperature=0.7, seed=3)
    stats = [RequestStats(), RequestStats()]
    first = decoder.decode("x", PROMPT, gen, stats[0])
    out = [[next(first)]]
    stages[0].install_head(1, str(head))
    second = decoder.decode("y", PROMPT, gen, stats[1])
    out.append([])
    for a, b in zip(first, second):
        out[0].append(a)
        out[1].append(b)
    out[0] += list(first)
    out[1] += list(second)
    assert [s.head_version for s in stats] == [0, 1]
    plain = Decoder(LocalPipe(local_stages(tiny_model_dir, 2, EXIT)), 2)
    assert out[0] == list(plain.decode("z", PROMPT, gen, RequestStats()))
    assert stages[0].sequences() == [] and list(stages[0]._heads) == [1]


# ---------------------------------------------------------------- what stage 1 records


@pytest.mark.parametrize("mode", ["ppsd", "eesd", "pp"])
def test_stage_one_hands_over_the_committed_positions_after_the_prompt(tiny_model_dir, mode):
    """The targets are the generated tokens but the last (the prompt's tokens never: only its last
    position's hidden state, which predicts the first generated token), each with the exit
    layer's hidden state of the position before it, through rollbacks and prompt chunks."""
    stages = learning_stages(tiny_model_dir)
    decoder = Decoder(LocalPipe(stages), 2, prefill_chunk=3)
    out, stats = decode(decoder, "r", mode=mode, max_new_tokens=24, gamma=3)
    assert stats.rollbacks > 0 or mode == "pp"
    samples = stages[0].take_samples()
    assert samples.targets.tolist() == out[:-1] and samples.head_version == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        states = model(torch.tensor([PROMPT + out]), output_hidden_states=True).hidden_states[EXIT]
    want = states[0, len(PROMPT) - 1: len(PROMPT) - 1 + len(out) - 1]
    assert samples.hidden.dtype == torch.float16
    torch.testing.assert_close(samples.hidden.float(), want, atol=2e-3, rtol=2e-3)
    assert stages[0].take_samples().targets.numel() == 0  # taken once
    assert stages[0].sequences() == []


def test_stage_one_keeps_at_most_learn_positions(tiny_model_dir):
    stages = learning_stages(tiny_model_dir, learn_positions=25)
    decoder = Decoder(LocalPipe(stages), 2)
    for seq in ("p", "q", "r"):
        decode(decoder, seq, mode="ppsd", max_new_tokens=12)
    assert stages[0].take_samples().targets.numel() == 22  # the newest two requests' 11 each


# ---------------------------------------------------------------- (b) the learner


def teacher_pairs(model_dir, n, seed=0):
    """Exit-layer-like hidden states and a fixed linear 'teacher''s greedy token for each."""
    teacher = new_head("linear", model_dir, EXIT)
    torch.manual_seed(100)
    with torch.no_grad():
        teacher.proj.weight.normal_(0, 2 / 64 ** 0.5)
        hidden = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
        return hidden.half(), teacher.draft_tokens(teacher.features(hidden.half().float()))


def learn_config(tmp_path, **kw):
    return LearnConfig(**{"buffer_positions": 4096, "holdout_fraction": 0.1, "min_holdout": 200,
                          "batch_positions": 128, "steps_per_round": 40, "lr": 1e-2, "store": tmp_path / "store",
                          **kw})


def test_the_buffer_holds_back_every_nth_pair_and_keeps_the_newest():
    buffer = TrafficBuffer(LearnConfig(buffer_positions=20, holdout_fraction=0.25, min_holdout=2,
                                       batch_positions=4))
    targets = torch.arange(100)
    buffer.add(torch.zeros(100, 8, dtype=torch.float16), targets)
    assert sorted(buffer.holdout.pairs()[1].tolist()) == list(range(63, 100, 4))[-5:]
    assert sorted(buffer.train.pairs()[1].tolist()) == [t for t in range(100) if t % 4 != 3][-20:]
    assert buffer.seen == 100


def test_the_learner_installs_a_better_head_and_never_a_worse_one(tiny_model_dir, tmp_path):
    config = learn_config(tmp_path, passes=1)  # a round of 40 x 128 positions trains each of 3000 once
    learner = OnlineLearner(tiny_model_dir, EXIT, "lm", 0, config)
    hidden, targets = teacher_pairs(tiny_model_dir, 3000)
    learner.add(hidden[:100], targets[:100])
    assert learner.round() is None  # too few held back to score anything
    learner.add(hidden[100:], targets[100:])
    result = learner.round()
    assert learner.round() is None  # every position trained on `passes` times: nothing new to learn from
    assert result.installed == 1 and learner.version == 1
    assert result.candidate_acceptance >= result.serving_acceptance + config.margin
    assert result.holdout_positions == 300
    meta = read_head_meta(HeadStore(config.store, tiny_model_dir, EXIT).path(1))
    assert meta["parent_version"] == 0 and meta["version"] == 1 and meta["positions_seen"] == 3000
    assert meta["holdout_greedy_acceptance"] == round(result.candidate_acceptance, 4)
    assert meta["head_type"] == "linear" and meta["exit_layer"] == EXIT

    # a poisoned buffer: the training pairs' targets are wrong, the held-back ones right
    wrong = (targets + 1) % 256
    poisoned = torch.where(torch.arange(3000) % 10 == 9, targets, wrong)
    learner.add(hidden, poisoned)
    before = {k: v.clone() for k, v in learner.serving.trainable_state().items()}
    result = learner.round()
    assert result.installed is None and result.candidate_acceptance < result.serving_acceptance
    assert learner.version == 1 and HeadStore(config.store, tiny_model_dir, EXIT).versions() == [1]
    for key, value in learner.candidate.trainable_state().items():  # the candidate starts again from it
        assert torch.equal(value, before[key]) and torch.equal(learner.serving.trainable_state()[key], before[key])

    # a margin no head can reach
    strict = OnlineLearner(tiny_model_dir, EXIT, "lm", 0, learn_config(tmp_path / "b", margin=1.0))
    strict.add(hidden, targets)
    assert strict.round().installed is None and not (tmp_path / "b" / "store").exists()


def test_versions_persist_and_list_export_restore(tiny_model_dir, tmp_path, capsys):
    config = learn_config(tmp_path)
    hidden, targets = teacher_pairs(tiny_model_dir, 3000)
    learner = OnlineLearner(tiny_model_dir, EXIT, "lm", 0, config)
    learner.add(hidden, targets)
    assert learner.round().installed == 1
    # a learner started from the store goes on from version 1, as a server restarted with --learn-drafts
    spec, version = starting_head(config, tiny_model_dir, EXIT, "lm")
    assert version == 1
    again = OnlineLearner(tiny_model_dir, EXIT, spec, version, config)
    held = learner.buffer.holdout.pairs()
    assert agreement(again.serving, *held) == agreement(learner.serving, *held)
    for seed in range(1, 6):  # a round needs new traffic
        again.add(*teacher_pairs(tiny_model_dir, 1000, seed=seed))
        if (result := again.round()) and result.installed:
            break
    store = HeadStore(config.store, tiny_model_dir, EXIT)
    assert store.versions() == [1, 2] and store.current() == 2
    assert read_head_meta(store.path(2))["parent_version"] == 1

    common = ["--model", str(tiny_model_dir), "--store", str(config.store)]
    assert main(["heads", "list", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["current"], r["parent_version"]) for r in rows] == [(1, False, 0), (2, True, 1)]
    assert main(["heads", "restore", "1", *common]) == 0
    assert store.current() == 1 and starting_head(config, tiny_model_dir, EXIT, "lm") == (str(store.path(1)), 1)
    assert main(["heads", "export", "2", str(tmp_path / "h.safetensors"), *common]) == 0
    assert (tmp_path / "h.safetensors").read_bytes() == store.path(2).read_bytes()
    capsys.readouterr()
    assert main(["heads", "restore", "9", *common]) == 2
    assert "version: no version 9" in capsys.readouterr().err
    # an exported version is an ordinary head file
    PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer=EXIT, head=str(tmp_path / "h.safetensors"))


# ---------------------------------------------------------------- (c) one model's head on another


def test_a_head_learned_for_one_model_is_refused_on_another(tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    build_tiny_model(other, seed=5)
    head = random_linear_head(tiny_model_dir, tmp_path / "h.safetensors")
    with pytest.raises(HeadMismatch, match="model_fingerprint .* was trained for another model"):
        check_head_meta(read_head_meta(head), other, EXIT, head)
    stage = local_stages(other, 2, EXIT)[0]
    with pytest.raises(HeadMismatch, match="trained for another model"):
        stage.install_head(1, str(head))
    assert stage.head_version == 0 and list(stage._heads) == [0]
    with pytest.raises(HeadMismatch, match="trained for another model"):
        OnlineLearner(other, EXIT, str(head), 3, learn_config(tmp_path))
    assert HeadStore(tmp_path, other, EXIT).dir != HeadStore(tmp_path, tiny_model_dir, EXIT).dir


# ---------------------------------------------------------------- configuration


def test_learning_settings_are_checked_naming_the_field(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="learn_drafts: needs a pipeline of at least 2 stages"):
        PipelineConfig(model_dir=tiny_model_dir, stages=1, learn_drafts=True)
    layer = new_head("layer", tiny_model_dir, EXIT)
    save_head(layer, tmp_path / "layer.safetensors", {"model_fingerprint": model_fingerprint(tiny_model_dir)})
    with pytest.raises(ValueError, match="learn_drafts: head .* is a 'layer' head"):
        PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer=EXIT, learn_drafts=True,
                       head=str(tmp_path / "layer.safetensors"))
    with pytest.raises(ValueError, match="learn_drafts: .* 'layer' head"):
        OnlineLearner(tiny_model_dir, EXIT, str(tmp_path / "layer.safetensors"), 0, learn_config(tmp_path))
    with pytest.raises(ValueError, match="batch_positions"):
        LearnConfig(buffer_positions=10, batch_positions=20)
    with pytest.raises(ValueError, match="holdout_fraction"):
        LearnConfig(holdout_fraction=0.9)
    assert PipelineConfig(model_dir=tiny_model_dir, stages=2, learn_drafts=True).learn.buffer_positions == 65536
    pipeline = {"model_dir": str(tiny_model_dir), "stages": 2, "learn_drafts": True}
    with pytest.raises(ValueError, match="pipeline.learn_drafts: the pipeline runs pp, which drafts nothing"):
        check_settings({"pipeline": pipeline, "mode": "pp"})
    assert check_settings({"pipeline": pipeline, "mode": "ppsd"}).pipeline.learn_drafts


# ---------------------------------------------------------------- (d) on Ray: the learner actor


def test_a_pipeline_that_learns_on_ray_installs_versions_and_changes_no_token(ray_cluster, tiny_model_dir, tmp_path):
    """Stage 1's committed positions reach the learner actor; with margin 0 its first round
    installs a version, which drafts the next request; every answer is transformers' own."""
    learn = learn_config(tmp_path, buffer_positions=512, holdout_fraction=0.25, min_holdout=8, batch_positions=16,
                         steps_per_round=5, margin=0.0, passes=1)  # one round of 80 covers the 45 positions
    config = PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer=EXIT, learn_drafts=True, learn=learn)
    prompts = [PROMPT, [1, 40, 41, 42], [9, 8, 7]]
    wants = [hf_greedy(tiny_model_dir, p, 16, stop_on_eos=False) for p in prompts]
    gen = GenerationConfig(mode="ppsd", max_new_tokens=16, stop_on_eos=False)
    with Pipeline(config) as pipe:
        results = pipe.generate_many(prompts, gen)
        assert [r.token_ids for r in results] == wants
        assert {r.stats["head_version"] for r in results} == {0}
        deadline = time.monotonic() + 120
        while not (status := pipe.learner_status()).installed and time.monotonic() < deadline:
            time.sleep(0.5)
        assert status.positions_seen == 3 * 15 and status.installed == [1], status
        assert status.priority in ("SCHED_IDLE", "nice 19") and status.error is None
        after = pipe.generate(prompts[0], gen)
        assert after.token_ids == wants[0] and after.stats["head_version"] == 1
    assert HeadStore(learn.store, tiny_model_dir, EXIT).current() == 1


@pytest.mark.real_model
def test_auto_with_learning_plans_a_head_it_can_train(real_model_dir):
    """SmolLM2's shipped heads are 'layer' heads, which learning cannot train: with learn_drafts,
    'auto' plans among the learnable ones (and a mode that drafts) instead of refusing."""
    kinds = {c.draft_key.partition("@")[0] for c in candidates(real_model_dir, 30, 2, None, "auto")}
    assert "layer" in kinds
    learnable = candidates(real_model_dir, 30, 2, None, "auto", learnable=True)
    assert learnable and {c.draft_key.partition("@")[0] for c in learnable} <= {"lm", "linear"}
    plan = resolve(PipelineConfig(model_dir=real_model_dir, learn_drafts=True))
    assert plan.mode == Mode.ppsd and plan.stages >= 2 and plan.head == "lm"
