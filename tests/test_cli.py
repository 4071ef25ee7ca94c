"""`ppsd generate` is a contract: --json prints one object per prompt and nothing else."""
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import hf_greedy
from ppsd_ray.model import encode_prompt, load_tokenizer


def ppsd(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ppsd_ray.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_generate_json_equals_transformers_greedy(tiny_model_dir, tmp_path):
    prompts = ["the people of the world", "water is good for life"]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    tokenizer = load_tokenizer(tiny_model_dir)
    for raw in (False, True):
        flags = ["--raw"] if raw else []
        out = ppsd("generate", "--prompts-file", file, "--model", tiny_model_dir, "--json",
                   "--max-new-tokens", 16, "--stages", 3, *flags)
        assert out.returncode == 0, out.stderr
        # mode auto on the 3 stages asked for: ppsd or pp, whichever is predicted faster
        assert "plan: " in out.stderr and "predicted stage steps" in out.stderr and "considered" in out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == len(prompts)
        for prompt, line in zip(prompts, lines):
            obj = json.loads(line)
            ids = encode_prompt(tokenizer, prompt, raw=raw)
            assert obj["prompt"] == prompt
            assert obj["token_ids"] == hf_greedy(tiny_model_dir, ids, 16)
            assert obj["text"] == tokenizer.decode(obj["token_ids"], skip_special_tokens=True)
            for key in ["new_tokens", "wall_s", "tokens_per_s", "drafted", "accepted", "acceptance_rate",
                        "rollbacks", "stage_compute_s", "stale_s"]:
                assert key in obj["stats"]


def test_bad_values_fail_before_ray_starts(tiny_model_dir, tmp_path):
    cases = [
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
    def run(extra):
        t0 = time.perf_counter()
        return ppsd("generate", "hello", "--model", tiny_model_dir, *extra), time.perf_counter() - t0

    with ThreadPoolExecutor(2) as pool:  # two at a time: each is mostly importing torch
        for (extra, field), (out, seconds) in zip(cases, pool.map(run, [extra for extra, _ in cases])):
            assert out.returncode == 2 and field in out.stderr, (extra, out.stderr)
            assert "Ray" not in out.stderr and seconds < 30
    out = ppsd("generate", "hello", "--model", tmp_path / "missing")
    assert out.returncode == 2 and "model_dir" in out.stderr
    out = ppsd("generate", "hello", "--mode", "fast")
    assert out.returncode == 2 and "fast" in out.stderr
