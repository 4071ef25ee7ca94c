"""Load and soak tests of a running server (`ppsd serve`), over HTTP with the standard library.

    python -m ppsd_ray.loadtest load --url http://127.0.0.1:8000 --clients 32 --max-tokens 64
    python -m ppsd_ray.loadtest soak --url http://127.0.0.1:8000 --minutes 20 --clients 8 --server-pid PID

load: each prompt alone, one after another (its sequential greedy answer), then all of
them at once, streaming; every concurrent answer must equal its sequential one (text and
token count). Reports p50/p99 time to first token and tokens/s; exit code 1 on a mismatch
or an error.

soak: a mix of requests (plain, streamed, streams the client closes early, stop strings,
sampled) from --clients threads for --minutes; reports the RSS of every Ray worker process
on this machine at the start and the end, and fails (exit code 1) on an error or when a
stage still holds a sequence after the end (GET /health). Run it on the server's machine.

The API key comes from --api-key or $PPSD_API_KEY. Each prints one JSON report (and writes it
to --out, with the machine and the command, for BENCHMARKS.md).

streams_with_kills (bench/kill_stages.py --via serve, and the tests): streaming clients
while stage processes are killed; every answer must equal its uninterrupted one.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .bench import machine_info
from .prompts import read_prompts

SUITE = Path(__file__).parent / "data" / "bench.jsonl"


@dataclass
class Answer:
    """One request as the client saw it."""
    status: int
    text: str = ""
    tokens: int | None = None        # usage.completion_tokens; None when the stream was closed early
    ttft_s: float | None = None      # request sent to the first text
    total_s: float = 0.0
    error: dict | None = None        # OpenAI's error body (a 4xx/5xx, or a stream's error event)


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")  # an application under a route prefix
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s

    def get(self, path: str) -> tuple[int, dict]:
        """(status, body); a body that is not JSON (Serve's own plain-text 503 while a replica
        is replaced) comes back as an OpenAI-style error."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request("GET", self.prefix + path, headers=self.headers)
            r = conn.getresponse()
            return r.status, _json_body(r)
        finally:
            conn.close()

    def chat(self, content: str, max_tokens: int, stream: bool = True, close_after: int | None = None,
             **fields) -> Answer:
        return self.post("/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                  "max_tokens": max_tokens, **fields}, stream, close_after)

    def complete(self, prompt: str | list[int], max_tokens: int, stream: bool = True,
                 close_after: int | None = None, **fields) -> Answer:
        return self.post("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, **fields},
                         stream, close_after)

    def post(self, path: str, body: dict, stream: bool, close_after: int | None = None) -> Answer:
        """close_after: a streaming client that goes away after that many events."""
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        t0 = time.perf_counter()
        try:
            conn.request("POST", self.prefix + path, json.dumps(body), self.headers)
            r = conn.getresponse()
            if r.status != 200 or not stream:
                data = _json_body(r)
                answer = Answer(r.status, total_s=time.perf_counter() - t0, error=data.get("error"))
                if r.status == 200:
                    choice = data["choices"][0]
                    answer.text = choice["message"]["content"] if "message" in choice else choice["text"]
                    answer.tokens = data["usage"]["completion_tokens"]
                return answer
            return _read_stream(r, t0, close_after)
        finally:
            conn.close()  # mid-stream: the server sees the client go away


def _json_body(r) -> dict:
    body = r.read()
    try:
        return json.loads(body)
    except ValueError:
        return {"error": {"message": body.decode(errors="replace")[:500]}}


def _read_stream(r, t0: float, close_after: int | None) -> Answer:
    answer, events = Answer(200), 0
    for line in r:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        events += 1
        if "error" in event:
            answer.error = event["error"]
            continue
        if event.get("usage"):
            answer.tokens = event["usage"]["completion_tokens"]
        for choice in event["choices"]:
            text = choice["delta"].get("content") if "delta" in choice else choice["text"]
            if text:
                if answer.ttft_s is None:
                    answer.ttft_s = time.perf_counter() - t0
                answer.text += text
        if close_after is not None and events >= close_after:
            break
    answer.total_s = time.perf_counter() - t0
    return answer


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * q // 100) - 1)]


def _spread(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


def _safely(request) -> Answer:
    """request(), or an Answer naming what went wrong on the client's side (reset, timeout)."""
    try:
        return request()
    except Exception as e:
        return Answer(0, error={"message": f"{type(e).__name__}: {e}"})


def _in_threads(n: int, work) -> list:
    """work(i) for i in range(n), each on its own thread, started together; the results in order."""
    results: list = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------- load


def load(client: Client, prompts: list[str], max_tokens: int) -> dict:
    """Each prompt alone, then all of them at once (one streaming client each), greedy."""
    alone = [_safely(lambda: client.chat(p, max_tokens)) for p in prompts]
    t0 = time.perf_counter()
    together = _in_threads(len(prompts), lambda i: _safely(lambda: client.chat(prompts[i], max_tokens)))
    wall = time.perf_counter() - t0
    failed = [i for i, a in enumerate(alone + together) if a.error or a.status != 200]
    different = [i for i, (a, b) in enumerate(zip(alone, together)) if (a.text, a.tokens) != (b.text, b.tokens)]
    tokens = sum(a.tokens or 0 for a in together)
    return {
        "clients": len(prompts), "max_tokens": max_tokens,
        "identical": len(prompts) - len(different), "different": different,
        "errors": [asdict(a) for a in alone + together if a.error or a.status != 200],
        "ok": not failed and not different,
        "ttft_s": _spread([a.ttft_s for a in together if a.ttft_s is not None]),
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
        "client_tokens_per_s": _spread([a.tokens / a.total_s for a in together if a.tokens and a.total_s]),
        "alone": {"ttft_s": _spread([a.ttft_s for a in alone if a.ttft_s is not None]),
                  "tokens_per_s": _spread([a.tokens / a.total_s for a in alone if a.tokens and a.total_s])},
    }


# ---------------------------------------------------------------- soak


KINDS = ("plain", "stream", "disconnect", "stop", "sampled")


@dataclass
class Mix:
    """What a mix of requests did."""
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    errors: list[dict] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)


def mixed_requests(client: Client, prompts: list[str], max_tokens: int, clients: int,
                   requests: int | None = None, seconds: float | None = None, seed: int = 0) -> Mix:
    """`requests` in all, or as many as fit in `seconds`, from `clients` threads: each a random
    kind. "disconnect" streams close after one to three events: the server must cancel them."""
    mix, lock = Mix(), threading.Lock()
    left = [requests]
    deadline = time.monotonic() + seconds if seconds is not None else None

    def request(kind: str, rng: random.Random) -> Answer:
        prompt, n, stream = rng.choice(prompts), rng.randint(1, max_tokens), rng.random() < 0.5
        if kind == "plain":
            return client.chat(prompt, n, stream=False)
        if kind == "stream":
            return client.complete(prompt, n)
        if kind == "disconnect":
            return client.chat(prompt, max_tokens, close_after=rng.randint(1, 3))
        if kind == "stop":
            return client.complete(prompt, n, stream=stream, stop=[" the", "."])
        return client.chat(prompt, n, stream=stream, temperature=0.8, seed=rng.randrange(2**31))

    def one(rng: random.Random) -> None:
        kind = rng.choice(KINDS)
        answer = _safely(lambda: request(kind, rng))
        with lock:
            mix.sent[kind] += 1
            mix.latency_s.append(answer.total_s)
            if answer.error or answer.status != 200:
                mix.errors.append({"kind": kind, **asdict(answer)})

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while deadline is None or time.monotonic() < deadline:
            with lock:
                if left[0] is not None:
                    if left[0] == 0:
                        return
                    left[0] -= 1
            one(rng)

    _in_threads(clients, worker)
    return mix


def ray_workers(server_pid: int | None = None) -> dict[int, tuple[str, float]]:
    """Ray worker processes: pid -> (process title, RSS in MiB). Those started under server_pid
    (`ppsd serve` starts its own Ray), else every one of this user's on this machine."""
    import psutil  # only the soak test needs it: lazily

    if server_pid is not None:
        candidates = psutil.Process(server_pid).children(recursive=True)
    else:
        me = psutil.Process().username()
        candidates = [p for p in psutil.process_iter() if p.username() == me]
    found = {}
    for p in candidates:
        try:
            cmd = p.cmdline()
            if cmd and cmd[0].startswith("ray::"):
                found[p.pid] = (cmd[0], p.memory_info().rss / 2**20)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def poll_health(client: Client, until, timeout_s: float) -> dict:
    """GET /health until until(health) holds for a 200, or timeout_s; the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, health = client.get("/health")
        if (status == 200 and until(health)) or time.monotonic() > deadline:
            return health
        time.sleep(0.5)


def wait_for_no_sequences(client: Client, timeout_s: float = 30) -> dict:
    """Until no request runs and no stage holds a sequence (cancels land after the next token)."""
    return poll_health(client, lambda h: h["running"] == 0 and not any(h["sequences"]), timeout_s)


def soak(client: Client, prompts: list[str], max_tokens: int, clients: int, minutes: float,
         server_pid: int | None = None) -> dict:
    before = ray_workers(server_pid)
    t0 = time.perf_counter()
    mix = mixed_requests(client, prompts, max_tokens, clients, seconds=minutes * 60)
    wall = time.perf_counter() - t0
    health = wait_for_no_sequences(client)
    after = ray_workers(server_pid)
    processes = [{"pid": pid, "title": title, "rss_mib_start": rss, "rss_mib_end": after.get(pid, (None, None))[1]}
                 for pid, (title, rss) in sorted(before.items())]
    processes += [{"pid": pid, "title": title, "rss_mib_start": None, "rss_mib_end": rss}
                  for pid, (title, rss) in sorted(after.items()) if pid not in before]
    leaked = health.get("running") != 0 or any(health.get("sequences", [1]))
    return {
        "minutes": wall / 60, "clients": clients, "requests": sum(mix.sent.values()), "sent": mix.sent,
        "errors": mix.errors[:20], "error_count": len(mix.errors), "latency_s": _spread(mix.latency_s),
        "health_after": health, "leaked": leaked, "ok": not mix.errors and not leaked,
        "rss_mib_total": {"start": sum(r for _, r in before.values()), "end": sum(r for _, r in after.values())},
        "processes": processes,
    }


# ---------------------------------------------------------------- kills


@dataclass
class KillReport:
    """Stage processes killed while streams ran: what the clients saw."""
    kills: int
    streams: int          # requests sent
    hit: int              # of those, running when a stage was killed
    identical: int        # of those, equal to the prompt's uninterrupted answer
    errors: list[dict]    # failed requests: an error status or event, or a client-side failure
    repairs: int          # pipeline rebuilds after a stage died
    leaked: bool          # a stage still held a sequence afterwards
    wall_s: float


def streams_with_kills(client: Client, prompts: list[str | list[int]], max_tokens: int, clients: int, kills: int,
                       seed: int = 0, repair_timeout_s: float = 120) -> KillReport:
    """`clients` threads stream completions of the prompts in turn while, `kills` times, a
    random stage's process gets SIGKILL at a random moment, each once the pipeline was repaired
    from the one before (GET /health names the stages' processes). Each answer must equal its
    prompt's uninterrupted one, asked first, one at a time. Run it on the server's machine."""
    rng = random.Random(seed)
    reference = [client.complete(p, max_tokens) for p in prompts]
    pause = 2 * sum(a.total_s for a in reference) / len(prompts)  # moments spread over whole streams
    answers: list[tuple[int, float, Answer]] = []  # (prompt, start, answer)
    killed_at: list[float] = []
    stop = threading.Event()
    health = poll_health(client, lambda h: True, repair_timeout_s)
    repairs_before, t0 = health["repairs"], time.perf_counter()

    def stream(i: int) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            answer = _safely(lambda: client.complete(prompts[i % len(prompts)], max_tokens))
            answers.append((i % len(prompts), start, answer))
            i += 1

    def kill() -> None:
        nonlocal health
        try:
            for _ in range(kills):
                time.sleep(rng.uniform(0, pause))
                victim = rng.choice(health["stage_pids"])
                os.kill(victim, signal.SIGKILL)
                killed_at.append(time.perf_counter())
                health = poll_health(client, lambda h: victim not in h["stage_pids"], repair_timeout_s)
                if victim in health.get("stage_pids", [victim]):
                    return  # not repaired: the report counts fewer kills
        finally:
            stop.set()

    _in_threads(clients + 1, lambda i: kill() if i == clients else stream(i))
    wall = time.perf_counter() - t0
    after = wait_for_no_sequences(client)
    failed = [a for _, _, a in answers if a.error or a.status != 200]
    return KillReport(
        kills=len(killed_at), streams=len(answers),
        hit=sum(any(start <= t <= start + a.total_s for t in killed_at) for _, start, a in answers),
        identical=sum((a.text, a.tokens) == (reference[p].text, reference[p].tokens) for p, _, a in answers),
        errors=[asdict(a) for a in failed], repairs=after.get("repairs", repairs_before) - repairs_before,
        leaked=after.get("running") != 0 or any(after.get("sequences", [1])), wall_s=wall)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppsd_ray.loadtest", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help in (("load", "concurrent streaming clients: identical answers, TTFT, tokens/s"),
                       ("soak", "mixed requests for N minutes: errors, leaks, Ray workers' RSS")):
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
        p.add_argument("--api-key", default=os.environ.get("PPSD_API_KEY"), help="default: $PPSD_API_KEY")
        p.add_argument("--prompts-file", type=Path, default=SUITE, help="default: the benchmark suite")
        p.add_argument("--max-tokens", type=int, default=64 if name == "load" else 32)
        p.add_argument("--clients", type=int, default=32 if name == "load" else 8)
        p.add_argument("--out", type=Path, help="also write the report here (`ppsd bench` puts "
                       "bench/results/load.json and soak.json into BENCHMARKS.md)")
        p.add_argument("--server", default="", help="how the server was started, recorded with the report")
    sub.choices["soak"].add_argument("--minutes", type=float, default=20)
    sub.choices["soak"].add_argument("--server-pid", type=int, help="the `ppsd serve` process: only the Ray "
                                     "workers it started are measured (default: all of this user's)")
    args = parser.parse_args(argv)
    for option in ("clients", "max_tokens"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')}: must be at least 1")
    prompts = [p.prompt for p in read_prompts(args.prompts_file)]
    client = Client(args.url, args.api_key)
    if args.command == "load":
        report = load(client, [prompts[i % len(prompts)] for i in range(args.clients)], args.max_tokens)
    else:
        report = soak(client, prompts, args.max_tokens, args.clients, args.minutes, args.server_pid)
    print(json.dumps(report, indent=1))
    if args.out:
        command = "python -m ppsd_ray.loadtest " + shlex.join(argv if argv is not None else sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"setup": machine_info() | {"command": command, "server": args.server},
                                        **report}, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
