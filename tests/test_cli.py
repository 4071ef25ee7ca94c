"""`ppsd generate` is a contract: --json prints one object per prompt and nothing else."""
import json
import subprocess
import sys
import time

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
    # one run, with the chat template (--raw reaches the same encoder: test_bad_inputs' long prompt)
    out = ppsd("generate", "--prompts-file", file, "--model", tiny_model_dir, "--json", "--max-new-tokens", 16,
               "--stages", 3)
    assert out.returncode == 0, out.stderr
    # mode auto on the 3 stages asked for: ppsd or pp, whichever is predicted faster
    assert "plan: " in out.stderr and "predicted stage steps" in out.stderr and "considered" in out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(prompts)
    for prompt, line in zip(prompts, lines):
        obj = json.loads(line)
        ids = encode_prompt(tokenizer, prompt)
        assert obj["prompt"] == prompt
        assert obj["token_ids"] == hf_greedy(tiny_model_dir, ids, 16)
        assert obj["text"] == tokenizer.decode(obj["token_ids"], skip_special_tokens=True)
        for key in ["new_tokens", "wall_s", "tokens_per_s", "drafted", "accepted", "acceptance_rate",
                    "rollbacks", "stage_compute_s", "stale_s"]:
            assert key in obj["stats"]


def test_a_bad_value_exits_2_in_seconds(tiny_model_dir):
    """The shell's side of a usage error (the messages themselves: test_bad_inputs, in process)."""
    t0 = time.perf_counter()
    out = ppsd("generate", "hello", "--model", tiny_model_dir, "--stages", 20)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "stages" in out.stderr, out.stderr
    assert "Ray" not in out.stderr and time.perf_counter() - t0 < 30
