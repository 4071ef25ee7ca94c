"""`ppsd serve` as a user runs it: a subprocess with its own local Ray, an API key,
bound to 127.0.0.1; SIGTERM stops it with exit code 0 and leaves no Ray process behind."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest


REPO = Path(__file__).resolve().parents[1]
KEY = "test-secret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: str | None = None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """(base URL, process, log path, pids it started), the key taken from $PPSD_API_KEY."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PPSD_API_KEY": KEY,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ppsd_ray.cli", "serve", "--model", str(tiny_model_dir),
                                 "--stages", "2", "--port", str(port), "--model-name", "tiny"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    deadline = time.time() + 180
    try:
        while True:
            assert proc.poll() is None, f"ppsd serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"ppsd serve not up after 180 s:\n{log.read_text()[-3000:]}"
            pids |= descendants(proc.pid)
            try:
                if get(base + "/health", KEY)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass  # ValueError: Serve's proxy answers a plain-text 404 until the app's routes are up
            time.sleep(1)
        pids |= descendants(proc.pid)
        yield base, proc, log, pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in pids | descendants(proc.pid):  # only what this test started
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


def test_binds_localhost_only(served):
    base, proc, _, _ = served
    port = int(base.rsplit(":", 1)[1])
    listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/v1/models/tiny"])
def test_every_endpoint_needs_the_key(served, path):
    base = served[0]
    for key in (None, "wrong-key"):
        status, body = get(base + path, key)
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert get(base + path, KEY)[0] == 200


def test_openai_client_with_and_without_the_key(served):
    base = served[0]
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="the", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the"}], max_tokens=2)
    good = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    r = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the"}], max_tokens=3)
    assert r.usage.completion_tokens == 3
    text = "".join(c.choices[0].delta.content or "" for c in good.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the"}], max_tokens=3, stream=True) if c.choices)
    assert text == r.choices[0].message.content


def test_sigterm_shuts_down_cleanly(served):
    """Last in this module: stops the server."""
    base, proc, log, pids = served
    pids |= descendants(proc.pid)
    assert len(pids) >= 3, pids  # gcs, raylet, workers: the Ray it started
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ppsd serve did not exit within 90 s of SIGTERM:\n{log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-3000:]
    deadline = time.time() + 20  # workers exit on their own once the raylet is gone
    alive = set(pids)
    while alive and time.time() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.5)
    left = {p: " ".join(psutil.Process(p).cmdline())[:120] for p in alive if psutil.pid_exists(p)}
    assert not left, left
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        get(base + "/health", KEY)
