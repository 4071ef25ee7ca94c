"""`ray job submit --working-dir . -- python jobs/generate.py ...` against a cluster
started with `ray start --head`, for real: the job's tokens equal transformers' greedy output.

The cluster is stopped by signalling the `ray start --block` process this test started,
not with `ray stop`, which would kill every Ray cluster of this user on the machine.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import hf_greedy


REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node from `ray start --head --block`; yields the job server's address."""
    gcs, dashboard, client, agent, metrics = free_ports(5)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    # its own temp dir (short: Ray's socket paths): other ray.init() calls on this machine
    # look for a `ray start` cluster in /tmp/ray and must not find and join this one
    temp_dir = tempfile.mkdtemp(prefix="ppsd-ray-")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
             "--metrics-export-port", str(metrics), "--disable-usage-stats", "--temp-dir", temp_dir],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    pids: set[int] = set()
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "ray start: no job server after 120 s\n" + log.read_text()[-3000:]
            pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            try:
                with urllib.request.urlopen(address + "/api/version", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        yield address, env
    finally:
        try:
            pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        time.sleep(2)
        for pid in pids:  # anything left of this cluster, by pid
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


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
