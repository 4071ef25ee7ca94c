"""Exit heads on the tiny model: self-distillation end to end (data over Ray actors,
training, file, loading), lossless decoding with a trained head that keeps its own KV
cache, refusal of a head trained for another model or exit layer, resumed training."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from conftest import WORDS, build_tiny_model, hf_greedy
from ppsd_ray import distill as D
from ppsd_ray.config import GenerationConfig, PipelineConfig
from ppsd_ray.heads import HeadMismatch, load_exit_head, read_head_meta, save_head
from ppsd_ray.model import encode_prompt, load_tokenizer, model_fingerprint
from ppsd_ray.plan import resolve
from ppsd_ray.prompts import read_prompts
from ppsd_ray.protocol import Work
from ppsd_ray.schedule import Decoder, RequestStats
from ppsd_ray.stage import Stage
from ppsd_ray.transport import LocalPipe

EXIT = 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppsd-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PPSD_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    lines = [{"prompt": " ".join(WORDS[(7 * i + j * 3) % 200] for j in range(4 + i % 5))} for i in range(12)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, prompts_file, cache, ray_cluster):
    spec = D.DataSpec(prompts_file=str(prompts_file), exit_layers=(EXIT,), max_new_tokens=12,
                      answers=2, batch_size=4)
    return D.build_dataset(tiny_model_dir, spec, workers=2, progress=False)


@pytest.fixture(scope="module")
def layer_head_file(tiny_model_dir, dataset, tmp_path_factory):
    records = D.load_dataset(dataset, EXIT)
    head = D.new_head("layer", tiny_model_dir, EXIT)
    stats = D.train_head(head, records, D.TrainSpec(head_type="layer", epochs=2, batch_seqs=4, warmup=2),
                         progress=False)
    acc = D.acceptance(head, [r for r in records if not r["sampled"]])
    path = tmp_path_factory.mktemp("heads") / "tiny.layer.safetensors"
    save_head(head, path, {"model_fingerprint": model_fingerprint(tiny_model_dir), "command": "test",
                           "training_tokens": stats["training_tokens"], "val_greedy_acceptance": acc["greedy"]})
    return path


def test_dataset_is_the_models_own_greedy_output(tiny_model_dir, dataset, prompts_file):
    records = D.load_dataset(dataset, EXIT)
    assert len(records) == 24 and sum(r["sampled"] for r in records) == 12
    assert len(D.load_dataset(dataset, EXIT, answers=1)) == 12
    tok = load_tokenizer(tiny_model_dir)
    prompts = [p.prompt for p in read_prompts(prompts_file)]
    norm, lm_head, _ = D.frozen_parts(tiny_model_dir)
    for r in records:
        p = r["prompt_len"]
        assert r["exit"].shape[0] == r["final"].shape[0] == len(r["ids"]) - 1
        if not r["sampled"]:  # batched, left-padded generate == transformers' own greedy, unbatched
            prompt = [i for i in r["ids"][:p].tolist()]
            assert prompt in [encode_prompt(tok, x) for x in prompts]
            assert r["ids"][p:].tolist() == hf_greedy(tiny_model_dir, prompt, 12)
            # the recorded final hidden state gives the model's next tokens
            assert lm_head(r["final"][p - 1:].float()).argmax(-1).tolist() == r["ids"][p:].tolist()


def test_trained_head_file_loads_with_metadata(tiny_model_dir, layer_head_file):
    meta = read_head_meta(layer_head_file)
    assert meta["head_type"] == "layer" and meta["exit_layer"] == EXIT
    assert meta["model_fingerprint"] == model_fingerprint(tiny_model_dir)
    assert layer_head_file.stat().st_size < 1_000_000  # the shared LM head is not in it
    norm, lm_head, config = D.frozen_parts(tiny_model_dir)
    head = load_exit_head(str(layer_head_file), EXIT, norm, lm_head, model_dir=tiny_model_dir, config=config)
    assert head.kind == "layer" and head.needs_cache


@pytest.mark.parametrize("mode,k", [("ppsd", 2), ("ppsd", 3), ("eesd", 2), ("eesd", 3)])
def test_layer_head_is_lossless(tiny_model_dir, layer_head_file, mode, k):
    config = PipelineConfig(model_dir=tiny_model_dir, stages=k, exit_layer=EXIT, head=str(layer_head_file))
    ranges = resolve(config).layer_ranges
    stages = [Stage(tiny_model_dir, a, b, index=i, num_stages=k, head=config.head, exit_layer=EXIT)
              for i, (a, b) in enumerate(ranges)]
    assert stages[0].exit_head.kind == "layer"
    decoder = Decoder(LocalPipe(stages), k, eos_token_ids=config.info.eos_token_ids)
    tok = load_tokenizer(tiny_model_dir)
    drafted = 0
    for n, prompt in enumerate(["the time of day", "water is a long way", "one two three four five"]):
        ids = encode_prompt(tok, prompt)
        stats = RequestStats()
        gen = GenerationConfig(mode=mode, max_new_tokens=24, gamma=3, stop_on_eos=False)
        out = list(decoder.decode(f"s{n}", ids, gen, stats))
        assert out == hf_greedy(tiny_model_dir, ids, 24, stop_on_eos=False)
        drafted += stats.drafted
        assert not stages[0].kv.heads  # released with the sequence
    assert drafted > 0


def test_head_cache_follows_the_layer_caches(tiny_model_dir, layer_head_file):
    def stage():
        return Stage(tiny_model_dir, 0, EXIT, index=0, num_stages=2, head=str(layer_head_file), exit_layer=EXIT)

    s = stage()
    prompt = [5, 6, 7, 8, 9]
    s.forward(Work("a", 0, 0, tuple(prompt), draft=True))
    s.forward(Work("a", 0, 5, (10,), draft=True))
    s.forward(Work("a", 0, 6, (11,)))  # no draft wanted: the head cache still advances
    assert s.kv.heads["a"].get_seq_length() == 7
    rerun = s.forward(Work("a", 1, 5, (12, 13), draft=True))  # rollback: entries >= 5 dropped first
    assert s.kv.heads["a"].get_seq_length() == 7
    fresh = stage().forward(Work("b", 0, 0, tuple(prompt) + (12, 13), draft=True))
    assert rerun.drafts == fresh.drafts and torch.allclose(rerun.hidden, fresh.hidden[:, -2:], atol=1e-5)
    s.release("a", 6)
    assert "a" not in s.kv.heads


def test_head_for_another_model_or_exit_is_refused(tiny_model_dir, layer_head_file, tmp_path):
    with pytest.raises(ValidationError, match="exit_layer 3 does not match the pipeline's exit layer 4"):
        PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer=4, head=str(layer_head_file))
    # exit_layer 'auto' takes the head's own: resolve checks it, naming the field as the config would
    assert resolve(PipelineConfig(model_dir=tiny_model_dir, stages=2, head=str(layer_head_file))).exit_layer == EXIT
    too_many = PipelineConfig(model_dir=tiny_model_dir, stages=7, head=str(layer_head_file))
    with pytest.raises(ValueError, match=r"^exit_layer: 3 leaves no layers for stages 2..7"):
        resolve(too_many)
    other = tmp_path / "other"
    build_tiny_model(other, seed=1)
    with pytest.raises(ValidationError, match="model_fingerprint"):
        PipelineConfig(model_dir=other, stages=2, exit_layer=EXIT, head=str(layer_head_file))
    norm, lm_head, config = D.frozen_parts(other)
    with pytest.raises(HeadMismatch, match="model_fingerprint"):
        load_exit_head(str(layer_head_file), EXIT, norm, lm_head, model_dir=other, config=config)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a head")
    with pytest.raises(ValidationError, match="not a safetensors head file"):
        PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer=EXIT, head=str(bogus))


def test_auto_head_is_lm_without_a_shipped_head(tiny_model_dir):
    assert resolve(PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer=EXIT)).head == "lm"
    assert resolve(PipelineConfig(model_dir=tiny_model_dir, stages=2, exit_layer=EXIT, head="lm")).head == "lm"


def test_training_resumes_after_interruption(tiny_model_dir, dataset, tmp_path):
    records = D.load_dataset(dataset, EXIT)
    spec = D.TrainSpec(head_type="linear", epochs=3, batch_seqs=4, warmup=2, ckpt_every=2)

    torch.manual_seed(0)
    straight = D.new_head("linear", tiny_model_dir, EXIT)
    D.train_head(straight, records, spec, ckpt=tmp_path / "a.pt", progress=False)

    class Stop(Exception):
        pass

    def interrupt(epoch):
        if epoch == 2:
            raise Stop
        return {}

    torch.manual_seed(0)
    first = D.new_head("linear", tiny_model_dir, EXIT)
    with pytest.raises(Stop):
        D.train_head(first, records, spec, ckpt=tmp_path / "b.pt", progress=False, on_epoch=interrupt)
    assert 0 < torch.load(tmp_path / "b.pt", weights_only=False)["step"] < 3 * len(records) // 4
    resumed = D.new_head("linear", tiny_model_dir, EXIT)  # a fresh process: new head, same command
    logs = []
    D.train_head(resumed, records, spec, ckpt=tmp_path / "b.pt", progress=False, log=logs.append)
    assert logs and logs[0].startswith("resuming")
    for a, b in zip(straight.trainable_state().values(), resumed.trainable_state().values()):
        torch.testing.assert_close(a, b)


def test_eval_acceptance_cli(tiny_model_dir, prompts_file, layer_head_file, cache, capsys):
    from ppsd_ray.cli import main

    assert main(["eval-acceptance", "--model", str(tiny_model_dir), "--prompts-file", str(prompts_file),
                 "--exit-layers", "2,3", "--heads", f"lm,{layer_head_file}", "--max-new-tokens", "8",
                 "--workers", "0", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["exit_layer"], r["head_type"]) for r in rows] == [(2, "lm"), (3, "lm"), (3, "layer")]
    assert all(0 <= r["greedy"] <= r["top2"] <= 1 and r["tokens"] > 0 for r in rows)


def test_training_job_records_its_command_and_reproduces(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """jobs/train_exit_head.py end to end in-process; its recorded command, run again from
    scratch (empty data and checkpoint cache), gives the same validation acceptance."""
    import shlex
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import train_exit_head

    args = ["--model", str(tiny_model_dir), "--exit-layer", str(EXIT), "--head-type", "linear",
            "--train-prompts", str(prompts_file), "--val-prompts", str(prompts_file), "--max-new-tokens", "8",
            "--val-max-new-tokens", "8", "--answers", "2", "--gen-batch", "4", "--workers", "0",
            "--epochs", "2", "--data-layers", "", "--no-progress", "--out", str(tmp_path / "a.safetensors")]
    monkeypatch.setenv("PPSD_CACHE", str(tmp_path / "cache-a"))
    assert train_exit_head.main(args) == 0
    meta = read_head_meta(tmp_path / "a.safetensors")
    assert meta["training_tokens"] > 0 and len(meta["history"]) == 2
    assert meta["val_greedy_acceptance"] == meta["history"][-1]["val_greedy"]
    recorded = shlex.split(meta["command"])
    assert recorded[:2] == ["python", "jobs/train_exit_head.py"] and recorded[2:] == args
    monkeypatch.setenv("PPSD_CACHE", str(tmp_path / "cache-b"))
    assert train_exit_head.main(recorded[2:-1] + [str(tmp_path / "b.safetensors")]) == 0
    assert read_head_meta(tmp_path / "b.safetensors")["val_greedy_acceptance"] == meta["val_greedy_acceptance"]
