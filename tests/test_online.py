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
from ppsd_ray.plan import resolve
from ppsd_ray.schedule import Decoder, RequestStats
from ppsd_ray.stage import Stage
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


def layer_head(model_dir, path):
    """A 'layer' head for the tiny model (layer EXIT's copy, its weights shaken so that it drafts
    wrong now and then), saved as a head file."""
    head = new_head("layer", model_dir, EXIT)
    torch.manual_seed(2)
    with torch.no_grad():
        for weight in head.body.parameters():
            weight.add_(torch.randn_like(weight) * weight.std().nan_to_num(0.1))
    save_head(head, path, {"model_fingerprint": model_fingerprint(model_dir)})
    return path


def learning_stages(model_dir, learn_positions=4096, head="lm"):
    stages = local_stages(model_dir, 2, EXIT)
    stages[0] = Stage(model_dir, stages[0].start, stages[0].stop, index=0, num_stages=2, exit_layer=EXIT, head=head,
                      learn_positions=learn_positions)
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


@pytest.mark.parametrize("mode,head", [("ppsd", "lm"), ("eesd", "lm"), ("pp", "lm"), ("ppsd", "layer"),
                                       ("eesd", "layer")])
def test_stage_one_hands_over_the_committed_positions(tiny_model_dir, tmp_path, mode, head):
    """The targets are the generated tokens but the last, each with the exit layer's hidden state
    of the position before it, through rollbacks and prompt chunks. The prompt's tokens never;
    of its hidden states only the last one's (it predicts the first generated token), or, for a
    head that attends, all of them as its context, with no target (-1) but at the last."""
    spec = "lm" if head == "lm" else str(layer_head(tiny_model_dir, tmp_path / "layer.safetensors"))
    stages = learning_stages(tiny_model_dir, head=spec)
    decoder = Decoder(LocalPipe(stages), 2, prefill_chunk=3)
    out, stats = decode(decoder, "r", mode=mode, max_new_tokens=24, gamma=3)
    assert stats.rollbacks > 0 or mode == "pp"
    samples = stages[0].take_samples()
    assert len(samples.hidden) == 1 and samples.head_version == 0
    first = 0 if head == "layer" else len(PROMPT) - 1
    assert samples.targets[0].tolist() == [-1] * (len(PROMPT) - 1 - first) + out[:-1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        states = model(torch.tensor([PROMPT + out]), output_hidden_states=True).hidden_states[EXIT]
    want = states[0, first: len(PROMPT) - 1 + len(out) - 1]
    assert samples.hidden[0].dtype == torch.float16
    torch.testing.assert_close(samples.hidden[0].float(), want, atol=2e-3, rtol=2e-3)
    assert stages[0].take_samples().targets == []  # taken once
    assert stages[0].sequences() == []


def test_stage_one_keeps_at_most_learn_positions(tiny_model_dir):
    stages = learning_stages(tiny_model_dir, learn_positions=25)
    decoder = Decoder(LocalPipe(stages), 2)
    for seq in ("p", "q", "r"):
        decode(decoder, seq, mode="ppsd", max_new_tokens=12)
    assert [t.numel() for t in stages[0].take_samples().targets] == [11, 11]  # the newest two requests


# ---------------------------------------------------------------- (b) the learner


def teacher_pairs(model_dir, n, seed=0):
    """Exit-layer-like hidden states and a fixed linear 'teacher''s greedy token for each."""
    teacher = new_head("linear", model_dir, EXIT)
    torch.manual_seed(100)
    with torch.no_grad():
        teacher.proj.weight.normal_(0, 2 / 64 ** 0.5)
        hidden = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
        return hidden.half(), teacher.draft_tokens(teacher.features(hidden.half().float()))


def add_sequences(learner, hidden, targets, size=10):
    """Pairs given to the learner as sequences of `size` positions each."""
    for i in range(0, len(targets), size):
        learner.add(hidden[i:i + size], targets[i:i + size])


def learn_config(tmp_path, **kw):
    return LearnConfig(**{"buffer_positions": 4096, "holdout_fraction": 0.1, "min_holdout": 200,
                          "batch_positions": 128, "steps_per_round": 40, "lr": 1e-2, "store": tmp_path / "store",
                          **kw})


def test_the_buffer_holds_back_every_nth_sequence_and_keeps_the_newest():
    buffer = TrafficBuffer(LearnConfig(buffer_positions=20, holdout_fraction=0.25, min_holdout=4,
                                       batch_positions=4))
    for i in range(25):  # sequences of 4 positions, the first without a target (a prompt's)
        buffer.add(torch.full((4, 8), i, dtype=torch.float16), torch.tensor([-1, i, i, i]))
    assert [int(t[1]) for _, t in buffer.holdout.seqs] == [23]  # every 4th; 5 positions fit
    assert [int(t[1]) for _, t in buffer.train.seqs] == [18, 20, 21, 22, 24]  # 20 positions
    hidden, targets = buffer.train.pairs()
    assert len(buffer.train) == 15 and targets.tolist() == [t for t in (18, 20, 21, 22, 24) for _ in range(3)]
    assert torch.equal(hidden[:, 0], targets.float())
    assert buffer.seen == 75


def test_the_learner_installs_a_better_head_and_never_a_worse_one(tiny_model_dir, tmp_path):
    config = learn_config(tmp_path, passes=1)  # a round of 40 x 128 positions trains each of 3000 once
    learner = OnlineLearner(tiny_model_dir, EXIT, "lm", 0, config)
    hidden, targets = teacher_pairs(tiny_model_dir, 3000)
    add_sequences(learner, hidden[:100], targets[:100])
    assert learner.round() is None  # too few held back to score anything
    add_sequences(learner, hidden[100:], targets[100:])
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
    poisoned = torch.where(torch.arange(3000) // 10 % 10 == 9, targets, wrong)  # every 10th sequence held back
    add_sequences(learner, hidden, poisoned)
    before = {k: v.clone() for k, v in learner.serving.trainable_state().items()}
    result = learner.round()
    assert result.installed is None and result.candidate_acceptance < result.serving_acceptance
    assert learner.version == 1 and HeadStore(config.store, tiny_model_dir, EXIT).versions() == [1]
    for key, value in learner.candidate.trainable_state().items():  # the candidate starts again from it
        assert torch.equal(value, before[key]) and torch.equal(learner.serving.trainable_state()[key], before[key])

    # a margin no head can reach
    strict = OnlineLearner(tiny_model_dir, EXIT, "lm", 0, learn_config(tmp_path / "b", margin=1.0))
    add_sequences(strict, hidden, targets)
    assert strict.round().installed is None and not (tmp_path / "b" / "store").exists()


def test_versions_persist_and_list_export_restore(tiny_model_dir, tmp_path, capsys):
    config = learn_config(tmp_path)
    hidden, targets = teacher_pairs(tiny_model_dir, 3000)
    learner = OnlineLearner(tiny_model_dir, EXIT, "lm", 0, config)
    add_sequences(learner, hidden, targets)
    assert learner.round().installed == 1
    # a learner started from the store goes on from version 1, as a server restarted with --learn-drafts
    spec, version = starting_head(config, tiny_model_dir, EXIT, "lm")
    assert version == 1
    again = OnlineLearner(tiny_model_dir, EXIT, spec, version, config)
    held = learner.buffer.holdout
    assert agreement(again.serving, held) == agreement(learner.serving, held)
    for seed in range(1, 6):  # a round needs new traffic
        add_sequences(again, *teacher_pairs(tiny_model_dir, 1000, seed=seed))
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


def test_a_layer_head_learns_from_whole_sequences(tiny_model_dir, tmp_path):
    """A 'layer' head attends over the positions before: it trains and is scored on whole
    sequences (the prompt's positions its context, without targets), and a better one is
    installed as a version that loads as a 'layer' head."""
    config = learn_config(tmp_path, passes=2, steps_per_round=60, batch_positions=64)
    learner = OnlineLearner(tiny_model_dir, EXIT, str(layer_head(tiny_model_dir, tmp_path / "l.safetensors")), 0,
                            config)
    hidden, targets = teacher_pairs(tiny_model_dir, 3000)
    for i in range(0, 3000, 20):  # 20 positions a sequence, the first 5 a prompt's
        learner.add(hidden[i:i + 20], torch.cat([torch.full((5,), -1), targets[i + 5:i + 20]]))
    assert learner.buffer.seen == 150 * 15
    result = learner.round()
    assert result.installed == 1 and result.holdout_positions == 15 * 15
    assert result.candidate_acceptance >= result.serving_acceptance + config.margin
    path = HeadStore(config.store, tiny_model_dir, EXIT).path(1)
    assert read_head_meta(path)["head_type"] == "layer"
    again = OnlineLearner(tiny_model_dir, EXIT, str(path), 1, config)
    assert agreement(again.serving, learner.buffer.holdout) == result.candidate_acceptance


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
    # one round of 80 covers the 45 positions; so small a step that the candidate scores as the
    # serving head, and margin 0 installs it
    learn = learn_config(tmp_path, buffer_positions=512, holdout_fraction=0.5, min_holdout=8, batch_positions=16,
                         steps_per_round=5, margin=0.0, passes=1, lr=1e-7)
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
def test_auto_with_learning_starts_from_the_best_shipped_head(real_model_dir):
    """With learn_drafts, 'auto' plans a mode that drafts, with the head it would draft with
    anyway: for SmolLM2-135M a shipped 'layer' head, which learning goes on training."""
    plan = resolve(PipelineConfig(model_dir=real_model_dir, learn_drafts=True))
    assert plan.mode == Mode.ppsd and plan.stages >= 2
    assert read_head_meta(plan.head)["head_type"] == "layer"
