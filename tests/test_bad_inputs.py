"""Every bad input in docs/bad-inputs.md ("CLI and Python API"): one clear message naming
the field, and on the command line a usage error (exit 2, one line on stderr) before
Ray starts. The CLI cases run `ppsd` in-process with Ray and the pipeline made to fail
if they are reached."""
import json
import shutil

import time

import pytest
import ray
import torch

from actors.pipeline import Pipeline
from conftest import hf_greedy
from ppsd_ray.cli import main
from ppsd_ray.config import GenerationConfig, ModelInfo, PipelineConfig, check_prompt, describe
from ppsd_ray.plan import resolve
from ppsd_ray.prompts import PromptsFileError, read_prompts


@pytest.fixture
def no_ray(monkeypatch):
    """A bad input must be refused before Ray starts or any actor is made."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(Pipeline, "__init__", refuse)


def usage_error(capsys, *argv) -> str:
    """Runs `ppsd ARGV`, which must end as a usage error: exit 2 and one line on stderr."""
    assert main([str(a) for a in argv]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "Traceback" not in out.err, out.err
    return out.err.strip()


PROMPTS_FILES = {  # name: (content, the message after 'FILE')
    "empty": ("", ": empty; no prompts in it"),
    "blank lines only": ("\n  \n", ": empty; no prompts in it"),
    "malformed JSON": ('{"prompt": "ok"}\n{"prompt": "cut\n', ":2: not JSON (Unterminated string"),
    "not an object": ('{"prompt": "ok"}\n["a list"]\n', ":2: an array, not an object with key 'prompt'"),
    "key-less": ('{"text": "the people"}\n', ":1: prompt: Field required"),
    "prompt not a string": ('\n{"prompt": 5}\n', ":2: prompt: Input should be a valid string"),
    "prompt null": ('{"prompt": null}\n', ":1: prompt: Input should be a valid string"),
    "empty prompt": ('{"prompt": "ok"}\n{"prompt": ""}\n', ":2: prompt: empty; a prompt needs some text"),
    "blank prompt": ('{"prompt": "  "}\n', ":1: prompt: empty; a prompt needs some text"),
    "category not a string": ('{"prompt": "ok", "category": 1}\n', ":1: category: Input should be a valid string"),
}


@pytest.mark.parametrize("name", PROMPTS_FILES)
def test_bad_prompts_file_names_file_line_and_field(name, tiny_model_dir, tmp_path, capsys, no_ray):
    content, message = PROMPTS_FILES[name]
    file = tmp_path / "p.jsonl"
    file.write_text(content)
    with pytest.raises(PromptsFileError) as e:
        read_prompts(file)
    assert str(e.value).startswith(f"{file}{message}")
    err = usage_error(capsys, "generate", "--prompts-file", file, "--model", tiny_model_dir)
    assert err == f"ppsd generate: error: prompts-file: {e.value}"


def test_every_command_reads_prompts_files_the_same_way(tiny_model_dir, tmp_path, capsys, no_ray):
    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt": "ok", "category": "chat"}\n{"text": "no prompt"}\n')
    want = f"prompts-file: {file}:2: prompt: Field required"
    for argv in (["generate"], ["bench", "--systems", "ar"], ["eval-acceptance", "--workers", 0]):
        err = usage_error(capsys, *argv, "--prompts-file", file, "--model", tiny_model_dir)
        assert err == f"ppsd {argv[0]}: error: {want}"
    missing = tmp_path / "missing.jsonl"
    for command in ("generate", "eval-acceptance"):
        err = usage_error(capsys, command, "--prompts-file", missing, "--model", tiny_model_dir)
        assert err.endswith(f"prompts-file: {missing}: no such file")
    err = usage_error(capsys, "generate", "--prompts-file", tmp_path, "--model", tiny_model_dir)
    assert err == f"ppsd generate: error: prompts-file: {tmp_path}: a directory, not a file"
    file.write_text('\n{"prompt": "x", "source": "notes are ignored"}\n\n{"prompt": "y", "category": "code"}\n')
    assert [(p.prompt, p.category, p.line) for p in read_prompts(file)] == [("x", "all", 2), ("y", "code", 4)]


BAD_VALUES = [  # (flags, the field the message names)
    (["--exit-layer", 99], "exit_layer"),
    (["--stages", 20], "stages"),
    (["--mode", "ar", "--stages", 2], "stages"),
    (["--max-new-tokens", 0], "max_new_tokens"),
    (["--gamma", 0], "gamma"),
    (["--temperature", -1], "temperature"),
    (["--top-p", 0], "top_p"),
    (["--top-k", -1], "top_k"),
    (["--seed", 2**63], "seed"),
]


def test_bad_values_name_their_field(tiny_model_dir, tmp_path, capsys, no_ray):
    for flags, field in BAD_VALUES:
        err = usage_error(capsys, "generate", "hello", "--model", tiny_model_dir, *flags)
        assert err.startswith(f"ppsd generate: error: {field}"), (flags, err)
    err = usage_error(capsys, "generate", "hello", "--model", tmp_path / "missing")
    assert err.startswith("ppsd generate: error: model_dir")
    with pytest.raises(SystemExit) as e:  # argparse's own choices
        main(["generate", "hello", "--mode", "fast"])
    assert e.value.code == 2 and "'fast'" in capsys.readouterr().err


def test_a_report_without_a_stored_bench(tmp_path, capsys, no_ray):
    err = usage_error(capsys, "bench", "--report-only", "--out", tmp_path, "--markdown", tmp_path / "B.md")
    assert err == (f"ppsd bench: error: out: {tmp_path / 'bench.json'}: no such file; "
                   f"`ppsd bench --out {tmp_path}` writes it")
    assert not (tmp_path / "B.md").exists()


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_argument(prompt, tiny_model_dir, capsys, no_ray):
    err = usage_error(capsys, "generate", prompt, "--model", tiny_model_dir)
    assert err == "ppsd generate: error: prompt: empty; a prompt needs some text"


def test_prompt_plus_max_new_tokens_over_the_context(tiny_model_dir, tmp_path, capsys, no_ray):
    long_prompt = " ".join(["the"] * 500)  # raw: 500 ids of the tiny model's 512 positions
    err = usage_error(capsys, "generate", long_prompt, "--raw", "--max-new-tokens", 20, "--model", tiny_model_dir)
    assert err == ("ppsd generate: error: max_new_tokens: prompt (500) + max_new_tokens (20) "
                   "exceeds the model's 512 positions")
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"prompt": "water is good"}) + "\n\n" + json.dumps({"prompt": long_prompt}) + "\n")
    err = usage_error(capsys, "generate", "--prompts-file", file, "--raw", "--max-new-tokens", 20,
                      "--model", tiny_model_dir)
    assert err == (f"ppsd generate: error: prompts-file: {file}:3: max_new_tokens: prompt (500) + "
                   "max_new_tokens (20) exceeds the model's 512 positions")
    err = usage_error(capsys, "generate", "water", "--max-new-tokens", 600, "--model", tiny_model_dir)
    assert err.startswith("ppsd generate: error: max_new_tokens: prompt (") and "512 positions" in err


def other_models_head(tiny_model_dir, path):
    """A well-formed linear head file whose metadata names another model."""
    from safetensors.torch import save_file

    meta = {"head_type": "linear", "exit_layer": 4, "model_fingerprint": "0123456789abcdef"}
    save_file({"proj.weight": torch.zeros(64, 64), "proj.bias": torch.zeros(64)}, path,
              metadata={"ppsd_head": json.dumps(meta)})
    return path


def test_head_file_for_another_model(tiny_model_dir, tmp_path, capsys, no_ray):
    head = other_models_head(tiny_model_dir, tmp_path / "other.linear.safetensors")
    err = usage_error(capsys, "generate", "water", "--model", tiny_model_dir, "--head", head)
    assert err.startswith(f"ppsd generate: error: head: {head}: model_fingerprint 0123456789abcdef "
                          "was trained for another model")
    not_a_head = tmp_path / "notes.txt"
    not_a_head.write_text("hello")
    err = usage_error(capsys, "generate", "water", "--model", tiny_model_dir, "--head", not_a_head)
    assert err.startswith(f"ppsd generate: error: head: {not_a_head} is not a safetensors head file")


@pytest.fixture(scope="module")
def sharded_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model saved in several shards with a model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(path, max_shard_size="400KB")
    for f in tiny_model_dir.iterdir():
        if not (f.name.startswith("model") and "safetensors" in f.name):
            shutil.copy(f, path / f.name)
    return path


def broken_copy(model_dir, dest, *, remove=(), config=None):
    shutil.copytree(model_dir, dest)
    for name in remove:
        (dest / name).unlink()
    if config is not None:
        (dest / "config.json").write_text(config)
    return dest


def test_model_dir_with_missing_weights(tiny_model_dir, sharded_model_dir, tmp_path, capsys, no_ray):
    index = json.loads((sharded_model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert PipelineConfig(model_dir=sharded_model_dir, stages=2).info.num_layers == 8  # complete: accepted
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "water"}\n')
    cases = [  # (model dir, the message after 'model_dir: ')
        (broken_copy(sharded_model_dir, tmp_path / "shard", remove=[shards[-1]]),
         f"{tmp_path / 'shard' / 'model.safetensors.index.json'} names 1 shard file(s) that are not there: "
         f"{shards[-1]}"),
        (broken_copy(tiny_model_dir, tmp_path / "none", remove=["model.safetensors"]),
         f"no weights in {tmp_path / 'none'}: neither model.safetensors nor model.safetensors.index.json"),
        (broken_copy(tiny_model_dir, tmp_path / "cfg", config=json.dumps({k: v for k, v in cfg.items()
                                                                          if k != "vocab_size"})),
         f"{tmp_path / 'cfg' / 'config.json'}: no vocab_size"),
        (broken_copy(tiny_model_dir, tmp_path / "json", config="{not json"),
         f"{tmp_path / 'json' / 'config.json'}: not JSON ("),
        (tmp_path / "nowhere", f"no config.json in {tmp_path / 'nowhere'}"),
    ]
    for model_dir, message in cases:
        with pytest.raises(ValueError) as e:
            PipelineConfig(model_dir=model_dir, stages=2)
        assert describe(e.value).startswith(f"model_dir: {message}"), describe(e.value)
        for argv in (["generate", "water"], ["bench", "--systems", "ar"],
                     ["eval-acceptance", "--prompts-file", prompts, "--workers", 0]):
            err = usage_error(capsys, *argv, "--model", model_dir)
            assert err.startswith(f"ppsd {argv[0]}: error: model_dir: {message}")


def test_model_dir_without_a_tokenizer(tiny_model_dir, tmp_path, capsys, no_ray):
    model_dir = broken_copy(tiny_model_dir, tmp_path / "notok", remove=["tokenizer.json"])
    err = usage_error(capsys, "generate", "water", "--model", model_dir)
    assert err.startswith(f"ppsd generate: error: model_dir: no usable tokenizer in {model_dir} (")


def test_check_prompt_names_the_field(tiny_model_dir):
    info, gen = ModelInfo.read(tiny_model_dir), GenerationConfig(max_new_tokens=12)
    assert (info.vocab_size, info.max_positions) == (256, 512)
    cases = [
        ([], "prompt_ids: empty; a prompt needs at least one token"),
        ([5, -1], "prompt_ids: [1] = -1 is outside the model's vocabulary [0, 256)"),
        ([5, 256], "prompt_ids: [1] = 256 is outside the model's vocabulary [0, 256)"),
        ([5, 1.0], "prompt_ids: [1] is float 1.0, not an int"),
        ([True], "prompt_ids: [0] is bool True, not an int"),
        (["5"], "prompt_ids: [0] is str '5', not an int"),
        ("the people", "prompt_ids: a list of token ids, not str"),
        (None, "prompt_ids: a list of token ids, not NoneType"),
        ([5] * 501, "max_new_tokens: prompt (501) + max_new_tokens (12) exceeds the model's 512 positions"),
    ]
    for ids, message in cases:
        with pytest.raises(ValueError) as e:
            check_prompt(ids, info, gen)
        assert str(e.value) == message
    import numpy as np

    check_prompt([0, 255] + [5] * 498, info, gen)  # the limits themselves are fine
    check_prompt(np.array([5, 6]).tolist(), info, gen)
    check_prompt(list(np.array([5, 6])), info, gen)  # numpy integers are ints


def test_python_api_refuses_bad_prompts_before_any_actor_call(ray_cluster, tiny_model_dir):
    gen = GenerationConfig(max_new_tokens=10)
    with Pipeline(PipelineConfig(model_dir=tiny_model_dir, stages=2)) as pipe:
        coordinator, pipe.coordinator = pipe.coordinator, None  # any actor call would be an AttributeError
        for ids, field in [([], "prompt_ids"), ([5, -3], "prompt_ids"), ([5, 256], "prompt_ids"),
                           ([5, 2.5], "prompt_ids"), ([5] * 505, "max_new_tokens")]:
            with pytest.raises(ValueError, match=f"^{field}: "):
                pipe.stream(ids, gen)  # at the call, not at the first next()
            with pytest.raises(ValueError, match=f"^{field}: "):  # a bad request, not a failed generation
                pipe.generate(ids, gen)
        pipe.coordinator = coordinator
        prompt = [5, 17, 42, 99]
        assert pipe.generate(prompt, gen).token_ids == hf_greedy(tiny_model_dir, prompt, 10)


def test_a_pipeline_the_cluster_cannot_place_fails_at_once_naming_the_setting(ray_cluster, tiny_model_dir):
    """Not a wait for actors that would never start: a ValueError naming the field, nothing left running."""
    import ray

    cpus = ray.cluster_resources()["CPU"]
    for config, field in [(PipelineConfig(model_dir=tiny_model_dir, stages=2, cpus_per_stage=cpus), "cpus_per_stage"),
                          (PipelineConfig(model_dir=tiny_model_dir, stages=2, use_gpus=True), "use_gpus")]:
        plan = resolve(config)  # planning may calibrate first: the wait in question is the actors'
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=f"^{field}: 2 stages need"):
            Pipeline(config, plan=plan)
        assert time.monotonic() - t0 < 5 and ray.is_initialized()  # the caller's Ray stays up


def test_training_job_checks_every_prompts_file_first(tiny_model_dir, tmp_path, monkeypatch, no_ray):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import train_exit_head

    monkeypatch.setenv("PPSD_CACHE", str(tmp_path / "cache"))
    good, bad = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    good.write_text('{"prompt": "water is good"}\n')
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(SystemExit) as e:  # the val file is used last, after hours of generation
        train_exit_head.main(["--model", str(tiny_model_dir), "--exit-layer", "4", "--train-prompts", str(good),
                              "--val-prompts", str(bad), "--answers", "1"])
    assert str(e.value) == f"prompts: {bad}:2: prompt: Input should be a valid string"
    assert not (tmp_path / "cache").exists()  # nothing generated
