"""`ray job submit --working-dir . -- python jobs/generate.py ...` against a cluster
started with `ray start --head`, for real: the job's tokens equal transformers' greedy output."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import free_ports, hf_greedy, ray_cluster_nodes


REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node from `ray start --head --block`; yields the job server's address."""
    dashboard, client, agent = free_ports(3)
    args = ["--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent)]
    address = f"http://127.0.0.1:{dashboard}"

    def job_server_up():
        try:
            with urllib.request.urlopen(address + "/api/version", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    with ray_cluster_nodes(tmp_path_factory.mktemp("ray-head"), [args], job_server_up) as (_, env):
        yield address, env


@pytest.mark.slow
def test_generate_job_equals_hf_greedy(ray_head, tiny_model_dir):
    from ppsd_ray.model import encode_prompt, load_tokenizer

    address, env = ray_head
    prompts = ["the people of the world", "what is the name"]
    prompts_file = tiny_model_dir.parent / "job_prompts.jsonl"  # absolute: the job reads it in place
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "jobs/generate.py", "--model", str(tiny_model_dir), "--stages", "2",
           "--max-new-tokens", "12", "--json", "--prompts-file", str(prompts_file)]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"prompt"')]
    assert [r["prompt"] for r in results] == prompts, run.stdout[-3000:]
    tokenizer = load_tokenizer(tiny_model_dir)
    for r in results:
        ids = encode_prompt(tokenizer, r["prompt"])
        assert r["token_ids"] == hf_greedy(tiny_model_dir, ids, 12)
        assert r["stats"]["new_tokens"] == len(r["token_ids"])
    assert "succeeded" in (run.stdout + run.stderr).lower()
