"""Cheaper drafts and balanced stages on the tiny model: draft vocabularies in exit heads
(restricted logits, lossless decoding, head files, refusal), building and attaching a
vocabulary, and `exit_layer='auto'` (calibration, its cache, the choice)."""
from __future__ import annotations

import json
import os
import random
import shlex

import pytest
import torch
from pydantic import ValidationError

from conftest import WORDS, build_tiny_model, hf_greedy
from ppsd_ray import calibrate, plan
from ppsd_ray import distill as D
from ppsd_ray.config import GenerationConfig, PipelineConfig
from ppsd_ray.heads import (HeadMismatch, build_head, load_exit_head, read_draft_vocab, read_head_meta, save_head,
                            shipped_heads)
from ppsd_ray.model import encode_prompt, load_tokenizer, model_fingerprint
from ppsd_ray.protocol import Hop
from ppsd_ray.schedule import Decoder, RequestStats
from ppsd_ray.stage import Stage
from ppsd_ray.transport import LocalPipe
from ppsd_ray.theory import batched_token_s, ppsd_speedup, ppsd_token_s
from ppsd_ray.simulate import Timing, simulate
from ppsd_ray.vocab import choose_vocab, read_vocab

EXIT = 3


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPSD_CACHE", str(tmp_path / "cache"))
    calibrate._MEMO.clear()
    yield tmp_path / "cache"
    calibrate._MEMO.clear()


def even_ids(vocab_size: int) -> torch.Tensor:
    return torch.arange(0, vocab_size, 2, dtype=torch.int64)


@pytest.fixture(scope="module")
def vocab_head_file(tiny_model_dir, tmp_path_factory):
    """An untrained layer head (a copy of layer EXIT) restricted to the even token ids."""
    torch.manual_seed(0)
    head = D.new_head("layer", tiny_model_dir, EXIT)
    head.set_draft_vocab(even_ids(head.lm_head.weight.shape[0]))
    path = tmp_path_factory.mktemp("heads") / "tiny.vocab.safetensors"
    save_head(head, path, {"model_fingerprint": model_fingerprint(tiny_model_dir), "command": "test",
                           "val_greedy_acceptance": 0.5})
    return path


def test_restricted_logits_are_the_full_logits_columns(tiny_model_dir):
    norm, lm_head, config = D.frozen_parts(tiny_model_dir)
    torch.manual_seed(0)
    head = build_head("linear", EXIT, norm, lm_head, config)
    torch.nn.init.normal_(head.proj.weight, std=0.1)
    feats = head.features(torch.randn(2, 5, config.hidden_size))
    full = head.logits(feats)
    assert head.draft_logits(feats)[1] is None and torch.equal(head.draft_tokens(feats), full.argmax(-1))
    ids = torch.tensor(sorted(random.Random(0).sample(range(config.vocab_size), 40)), dtype=torch.int64)
    head.set_draft_vocab(ids)
    logits, columns = head.draft_logits(feats)
    assert torch.equal(columns, ids)
    torch.testing.assert_close(logits, full[..., ids])
    drafts = head.draft_tokens(feats)
    assert torch.equal(drafts, ids[full[..., ids].argmax(-1)])
    assert set(drafts.flatten().tolist()) <= set(ids.tolist())
    assert not torch.equal(drafts, full.argmax(-1))  # the restriction changed some drafts
    lm_head.softcap = 0.5  # a family's logit transform (Gemma 2) applies to the draft logits too
    head.set_draft_vocab(ids)
    capped = head.logits(feats)
    assert capped.abs().max() <= 0.5 and not torch.allclose(capped, full)
    torch.testing.assert_close(head.draft_logits(feats)[0], capped[..., ids])
    head.set_draft_vocab(None)
    lm_head.softcap = None
    assert torch.equal(head.draft_tokens(feats), full.argmax(-1))


def test_vocab_head_drafts_only_its_tokens_and_is_lossless(tiny_model_dir, vocab_head_file):
    config = PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer=EXIT, head=str(vocab_head_file))
    resolved = plan.resolve(config, "ppsd")
    stages = [Stage(tiny_model_dir, a, b, index=i, num_stages=2, head=resolved.head, exit_layer=EXIT)
              for i, (a, b) in enumerate(resolved.layer_ranges)]
    allowed = set(stages[0].exit_head.draft_vocab.tolist())
    drafts = []
    forward = stages[0].forward

    def recording(*args, **kwargs):
        hop = forward(*args, **kwargs)
        if isinstance(hop, Hop):
            drafts.extend(hop.drafts)
        return hop

    stages[0].forward = recording
    decoder = Decoder(LocalPipe(stages), 2, eos_token_ids=config.info.eos_token_ids)
    tok = load_tokenizer(tiny_model_dir)
    accepted = 0
    for n, prompt in enumerate(["the time of day", "water is a long way", "one two three four five"]):
        ids = encode_prompt(tok, prompt)
        for mode in ("ppsd", "eesd"):
            stats = RequestStats()
            out = list(decoder.decode(f"s{n}{mode}", ids, GenerationConfig(mode=mode, max_new_tokens=24, gamma=3,
                                                                          stop_on_eos=False), stats))
            assert out == hf_greedy(tiny_model_dir, ids, 24, stop_on_eos=False)
            accepted += stats.accepted
    assert drafts and set(drafts) <= allowed
    assert accepted > 0  # drafts were both made and taken
    drafts.clear()  # sampled drafts come from the vocabulary too
    sampled = GenerationConfig(mode="ppsd", max_new_tokens=24, stop_on_eos=False, temperature=1.0, seed=3)
    list(decoder.decode("t", encode_prompt(tok, "the time of day"), sampled, RequestStats()))
    assert len(drafts) > 5 and set(drafts) <= allowed


def test_head_file_with_vocab_round_trips(tiny_model_dir, vocab_head_file):
    meta = read_head_meta(vocab_head_file)
    vocab_size = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert meta["draft_vocab_size"] == len(even_ids(vocab_size)) and meta["command"] == "test"
    assert vocab_head_file.stat().st_size < 1_000_000
    norm, lm_head, config = D.frozen_parts(tiny_model_dir)
    head = load_exit_head(str(vocab_head_file), EXIT, norm, lm_head, model_dir=tiny_model_dir, config=config)
    assert torch.equal(head.draft_vocab, even_ids(vocab_size))
    assert head.draft_vocab.dtype == torch.int64
    torch.testing.assert_close(head.draft_lm_head.weight, lm_head.weight[even_ids(vocab_size)])
    assert head.lm_head.weight.shape[0] == vocab_size  # the shared LM head is untouched
    assert not any(k.startswith("draft") for k in head.trainable_state())  # weights stay the head's own


def _rewrite(src, dst, state_edit=None, meta_edit=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["ppsd_head"])
    state_edit and state_edit(state)
    meta_edit and meta_edit(meta)
    save_file(state, dst, metadata={"ppsd_head": json.dumps(meta)})
    return dst


def test_head_mismatched_on_vocab_or_model_is_refused(tiny_model_dir, vocab_head_file, tmp_path):
    def config(path, model=tiny_model_dir):
        return PipelineConfig(model_dir=model, stages=2, exit_layer=EXIT, head=str(path))

    outside = _rewrite(vocab_head_file, tmp_path / "outside.safetensors",
                       lambda s: s.update(draft_vocab=torch.tensor([1, 5, 100_000])),
                       lambda m: m.update(draft_vocab_size=3))
    with pytest.raises(ValidationError, match="outside the model's vocabulary"):
        config(outside)
    unsorted = _rewrite(vocab_head_file, tmp_path / "unsorted.safetensors",
                        lambda s: s.update(draft_vocab=torch.tensor([5, 1, 7])), lambda m: m.update(draft_vocab_size=3))
    with pytest.raises(ValidationError, match="sorted and unique"):
        config(unsorted)
    size = _rewrite(vocab_head_file, tmp_path / "size.safetensors", meta_edit=lambda m: m.update(draft_vocab_size=7))
    with pytest.raises(ValidationError, match="draft_vocab_size 7 does not match"):
        config(size)
    norm, lm_head, cfg = D.frozen_parts(tiny_model_dir)
    with pytest.raises(HeadMismatch, match="draft_vocab_size"):
        load_exit_head(str(size), EXIT, norm, lm_head, model_dir=tiny_model_dir, config=cfg)
    other = tmp_path / "other"
    build_tiny_model(other, seed=1)
    with pytest.raises(ValidationError, match="model_fingerprint"):
        config(vocab_head_file, other)


def test_choose_vocab_covers_then_fills_with_lowest_ids():
    from collections import Counter

    counts = Counter({50: 60, 7: 30, 9: 9, 3: 1})
    assert choose_vocab(counts, 0.9, 100).tolist() == [7, 50]
    assert choose_vocab(counts, 0.99, 100).tolist() == [7, 9, 50]
    assert choose_vocab(counts, 0.99, 100, size=6).tolist() == [0, 1, 2, 7, 9, 50]
    with pytest.raises(ValueError, match="size"):
        choose_vocab(counts, 0.99, 100, size=2)


def test_draft_vocab_and_attach_commands_record_and_reproduce(tiny_model_dir, tmp_path, cache, capsys):
    """`ppsd draft-vocab` then `ppsd attach-vocab` on a head file; the vocabulary's recorded
    command gives the same vocabulary again; a vocabulary for another model is refused."""
    from ppsd_ray.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[(7 * i + 3 * j) % 200] for j in range(5))}) + "\n"
                               for i in range(12)))
    args = ["draft-vocab", "--model", str(tiny_model_dir), "--prompts-files", str(prompts), "--every", "2",
            "--max-new-tokens", "12", "--coverage", "0.9", "--val-prompts", str(prompts), "--workers", "0",
            "--out", str(tmp_path / "v.safetensors")]
    assert main(args) == 0
    built = json.loads(capsys.readouterr().out.splitlines()[-1])
    vocab_size = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    ids, meta = read_vocab(tmp_path / "v.safetensors", vocab_size)
    assert meta["sample_coverage"] >= 0.9 and 0 < meta["val_coverage"] <= 1 and built["size"] == len(ids)
    assert meta["model_fingerprint"] == model_fingerprint(tiny_model_dir)
    recorded = shlex.split(meta["command"])
    assert recorded[0] == "ppsd" and recorded[1:] == args
    assert main(recorded[1:-1] + [str(tmp_path / "again.safetensors")]) == 0
    assert torch.equal(read_vocab(tmp_path / "again.safetensors", vocab_size)[0], ids)

    head = D.new_head("linear", tiny_model_dir, EXIT)
    head_file = tmp_path / "h.safetensors"
    save_head(head, head_file, {"model_fingerprint": model_fingerprint(tiny_model_dir), "command": "train it"})
    capsys.readouterr()
    assert main(["attach-vocab", str(head_file), "--vocab", str(tmp_path / "v.safetensors"), "--model",
                 str(tiny_model_dir), "--val-prompts", str(prompts), "--workers", "0"]) == 0
    head_meta = read_head_meta(head_file)
    assert head_meta["draft_vocab_size"] == len(ids) and head_meta["draft_vocab"]["size"] == len(ids)
    assert head_meta["command"] == "train it" and head_meta["attach_command"].startswith("ppsd attach-vocab")
    assert 0 <= head_meta["val_greedy_acceptance"] <= 1 and "full_vocab_val_greedy_acceptance" in head_meta

    other = tmp_path / "other"
    build_tiny_model(other, seed=1)
    save_head(D.new_head("linear", other, EXIT), tmp_path / "o.safetensors",
              {"model_fingerprint": model_fingerprint(other), "command": "x"})
    assert main(["attach-vocab", str(tmp_path / "o.safetensors"), "--vocab", str(tmp_path / "v.safetensors"),
                 "--model", str(other), "--val-prompts", str(prompts), "--workers", "0"]) == 2
    assert "built for model" in capsys.readouterr().err


def test_exit_layer_auto_is_valid_and_calibrated_once(tiny_model_dir, cache, monkeypatch):
    config = PipelineConfig(model_dir=tiny_model_dir, stages=2)
    assert config.exit_layer == "auto" and not list(cache.glob("calibration/*.json"))  # a config does not plan
    resolved = plan.resolve(config, "ppsd")
    assert resolved.predicted and resolved.mode.value == "ppsd"
    e = resolved.exit_layer
    assert 1 <= e <= 7 and resolved.layer_ranges == [(0, e), (e, 8)] and resolved.head == "lm"
    assert len(resolved.stage_s) == 2 and resolved.token_s > 0
    assert f"ppsd on 2 stages (layers 0-{e} | {e}-8)" in resolved.describe()
    assert f"exit layer {e}, head lm (acceptance " in resolved.describe()
    files = list((cache / "calibration").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith(model_fingerprint(tiny_model_dir))
    calibrate._MEMO.clear()  # a new process: reads the file, measures nothing

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibrate, "measure", no_measuring)
    again = PipelineConfig(model_dir=tiny_model_dir, stages=2)
    assert plan.resolve(again, "ppsd").exit_layer == e
    assert plan.resolve(PipelineConfig(model_dir=tiny_model_dir, stages=3), "ppsd").layer_ranges[-1][1] == 8
    one = plan.resolve(PipelineConfig(model_dir=tiny_model_dir, stages=1), "ar")
    assert not one.predicted and one.layer_ranges == [(0, 8)] and one.mode.value == "ar"
    with pytest.raises(ValidationError, match="exit_layer"):
        PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer="soon")
    if not torch.cuda.is_available():  # GPU stages configured here: calibrated on this CPU instead
        assert plan.stage_target(2, True, None, "auto") == ("cpu", 1, "bfloat16")


def test_auto_balances_the_stages_by_cost(tiny_model_dir, cache):
    """Stage 1 = E layers + the draft, stage 2 = the rest + the LM head: a cheaper draft moves E deeper."""
    def plan_with(draft_s):
        fp = model_fingerprint(tiny_model_dir)
        path = calibrate.cache_file(fp, "cpu", 1, "float32")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(calibrate.Calibration(model_fingerprint=fp, device="cpu", threads=1, dtype="float32",
                                              layer_s=1.0, lm_head_s=3.0, draft_s={"lm": draft_s}).model_dump_json())
        calibrate._MEMO.clear()
        return plan.fastest(tiny_model_dir, 2, None, "lm", "cpu", 1, "float32")

    assert plan_with(3.0).exit_layer == 4 and plan_with(3.0).stage_s == [7.0, 7.0]
    assert plan_with(1.0).exit_layer == 5 and plan_with(1.0).stage_s == [6.0, 6.0]


def test_token_time_for_unbalanced_stages():
    for alpha in (0.0, 0.4, 1.0):  # balanced: the ideal speedup
        assert ppsd_token_s(alpha, [0.25] * 4) == pytest.approx(1 / ppsd_speedup(alpha, 4))
    rng = random.Random(0)
    trace = [rng.random() < 0.6 for _ in range(4000)]
    for steps in ([3.0, 5.0], [5.0, 3.0], [2.0, 4.0, 3.0], [6.0, 2.0, 3.0, 1.0]):  # the simulator agrees
        for hop in (0.0, 0.5):
            sim = simulate(Timing(steps, hop), trace, 4000, window=len(steps))
            assert sim.decode_s / 4000 == pytest.approx(ppsd_token_s(0.6, steps, hop), rel=0.05)
    # a heavy stage 1 is worse than a heavy last stage: a rejection waits for its stale draft
    assert ppsd_token_s(0.0, [5.0, 3.0]) == 10.0 and ppsd_token_s(0.0, [3.0, 5.0]) == 8.0


def test_batched_token_time_fills_the_ring_with_batches():
    assert batched_token_s([8.0], 16) == 0.5                  # one stage: a step per token of every sequence
    assert batched_token_s([3.0, 5.0], 1) == 8.0              # one sequence: the pipe's latency
    assert batched_token_s([3.0, 5.0], 16) == 10.0 / 16       # two batches: the slow stage runs both per round
    assert batched_token_s([4.0, 4.0, 4.0], 2) == 12.0 / 2    # fewer batches than stages: the latency


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one stage and two stages get different thread counts")
def test_mode_auto_under_load_plans_for_the_throughput_of_its_concurrency(tiny_model_dir, cache, monkeypatch):
    """A calibration in which two stages are slower than one alone, but one stage's batched step
    grows steeply with its rows: one request plans ar, 16 at once plan two stages, by the
    batched steps (theory.batched_token_s), and the plan says so. Stages planned for one
    sequence (concurrency 1, or max_num_seqs 1) are predicted from the unbatched steps."""
    fp = model_fingerprint(tiny_model_dir)
    cores = os.cpu_count()
    for t in range(1, cores + 1):  # all cores: one stage; fewer: a stage of several (flat batches)
        steep = t == cores
        batched = {b: calibrate.BatchStep(layer_s=(1.0 + 0.2 * b) if steep else 1.5 + 0.1 * b,
                                          lm_head_s=(2.0 + 0.2 * b) if steep else 3.0)
                   for b in calibrate.ROWS}
        path = calibrate.cache_file(fp, "cpu", t, "float32")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(calibrate.Calibration(
            model_fingerprint=fp, device="cpu", threads=t, dtype="float32", layer_s=1.0 if steep else 1.5,
            lm_head_s=2.0 if steep else 3.0, draft_s={"lm": 1.0}, contention={k: 1.0 for k in range(1, 4)},
            batched=batched).model_dump_json())
    calibrate._MEMO.clear()

    alone = plan.resolve(PipelineConfig(model_dir=tiny_model_dir), "auto")
    assert (alone.mode.value, alone.stages, alone.threads) == ("ar", 1, cores)
    # planned for one sequence: its stages run rows with the 1-row kernel, predicted unbatched
    assert alone.batched_tokens_per_s is None and alone.token_s == pytest.approx(8 * 1.0 + 2.0)
    loaded = plan.resolve(PipelineConfig(model_dir=tiny_model_dir, concurrency=16), "auto")
    assert loaded.stages >= 2 and loaded.mode.value == "ppsd"  # above draft_max_seqs ppsd runs as pp: a tie
    options = {c.rsplit(" ", 1)[0]: float(c.rsplit(" ", 1)[1]) for c in loaded.considered}
    assert options[f"ar K=1 t={cores}"] == pytest.approx(16 / (8 * 4.2 + 5.2), abs=0.05)  # all on one stage
    assert options["ar K=1 t=1"] == pytest.approx(16 / (8 * 3.1 + 3.0), abs=0.05)
    assert "16 sequences at once" in loaded.describe()
    unbatched = plan.resolve(PipelineConfig(model_dir=tiny_model_dir, max_num_seqs=1), "auto")
    assert unbatched.batched_tokens_per_s is None and unbatched.token_s == pytest.approx(8 * 1.0 + 2.0)
    # one stage for one sequence runs in the caller's process; many sequences, a cluster to join, or
    # in_process False, in actors
    assert unbatched.in_process and not alone.in_process
    assert plan.resolve(PipelineConfig(model_dir=tiny_model_dir, stages=1, max_num_seqs=1, in_process=False),
                        "ar").in_process is False
    assert plan.resolve(PipelineConfig(model_dir=tiny_model_dir, in_process=True), "auto").stages == 1
    with pytest.raises(ValueError, match="in_process"):  # an explicit mode of 2 stages is not run in-process
        plan.resolve(PipelineConfig(model_dir=tiny_model_dir, in_process=True), "ppsd")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not plan.resolve(PipelineConfig(model_dir=tiny_model_dir, max_num_seqs=1), "auto").in_process
    two = plan.predict(PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer=4, concurrency=16), "pp")
    steps = [4 * 2.3, 4 * 2.3 + 3.0]  # 8 rows per stage: the sequences in two batches
    assert two.batched_tokens_per_s == pytest.approx(1 / batched_token_s(steps, 16))
    at_12 = plan.at_rows(calibrate.Calibration.model_validate_json(path.read_text()).batched, 12)
    assert at_12.layer_s == pytest.approx(1.0 + 0.2 * 12)  # between measured row counts: linear
    with pytest.raises(ValidationError, match="concurrency"):
        PipelineConfig(model_dir=tiny_model_dir, concurrency=64, max_num_seqs=32)


def test_shipped_heads_are_small_and_carry_a_recorded_vocabulary():
    assert shipped_heads()
    for path in shipped_heads():
        meta = read_head_meta(path)
        assert path.stat().st_size < 20e6
        ids = read_draft_vocab(path, meta, meta["vocab_size"])
        assert len(ids) == meta["draft_vocab_size"] == meta["draft_vocab"]["size"]
        assert meta["draft_vocab"]["command"].startswith("ppsd draft-vocab")
        assert meta["attach_command"].startswith("ppsd attach-vocab") and meta["command"].startswith("python jobs/")
        assert meta["val_greedy_acceptance"] <= meta["full_vocab_val_greedy_acceptance"] + 0.01


def test_calibrate_command_measures_and_reports_the_choice(tiny_model_dir, cache, capsys):
    from ppsd_ray.cli import main

    assert main(["calibrate", "--model", str(tiny_model_dir), "--threads", "1", "--drafts", "layer@64",
                 "--runs", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layer_ms"] > 0 and out["lm_head_ms"] > 0 and {"lm", "layer@64"} <= out["draft_ms"].keys()
    assert out["auto"].startswith("exit layer ") and "predicted stage steps" in out["auto"]
    assert calibrate.cache_file(model_fingerprint(tiny_model_dir), "cpu", 1, "float32").is_file()


def test_calibration_times_the_stages_a_single_stream_pipeline_runs(tiny_model_dir, cache, monkeypatch):
    """The layer and LM head steps come from real Stages with the 1-row kernels (batched=False),
    one decode call at CONTEXT, not from a stand-in model (which timed 10-35% off the stage)."""
    seen = []
    forward_batch = Stage.forward_batch

    def spy(self, calls):
        if all(not w.prompt for w, _ in calls):
            seen.append((self.batched, self.stop - self.start, len(calls), calls[0][0].pos))
        return forward_batch(self, calls)
    monkeypatch.setattr(Stage, "forward_batch", spy)
    cal = calibrate.measure(tiny_model_dir, "cpu", 1, "float32", set(), runs=3)
    layers = PipelineConfig(model_dir=tiny_model_dir).info.num_layers
    assert cal.layer_s > 0 and cal.lm_head_s > 0
    assert {(False, layers, 1, calibrate.CONTEXT), (False, 1, 1, calibrate.CONTEXT)} == set(seen)


def test_mode_auto_picks_the_fastest_predicted_plan_and_obeys_given_stages(tiny_model_dir, cache):
    """auto weighs ar on one stage (every thread, half, one) against ppsd and pp on K stages,
    each predicted from the calibration (multi-stage CPU plans slowed by the measured
    contention), and takes the fastest; given stages, it chooses only the mode."""
    free = plan.resolve(PipelineConfig(model_dir=tiny_model_dir), "auto")
    assert free.predicted and len(free.considered) >= 3  # ar K=1, ppsd K=2, pp K=2 at least
    options = {c.rsplit(" ", 1)[0]: float(c.rsplit(" ", 1)[1]) for c in free.considered}
    assert f"{free.mode.value} K={free.stages} t={free.threads}" == max(options, key=options.get)
    cores = os.cpu_count() or 1
    assert {f"ar K=1 t={t}" for t in (cores, 1)} <= options.keys()
    fixed = plan.resolve(PipelineConfig(model_dir=tiny_model_dir, stages=2), "auto")
    assert fixed.stages == 2 and fixed.mode.value in ("ppsd", "pp") and fixed.contention >= 1.0
    t = max(1, cores // 2)
    assert {c.rsplit(" ", 1)[0] for c in fixed.considered} == {f"ppsd K=2 t={t}", f"pp K=2 t={t}"}
