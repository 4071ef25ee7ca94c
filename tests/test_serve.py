"""The Ray Serve application (actors/serve.py) on the session's Ray cluster, driven
with the official `openai` client and plain HTTP: answers equal transformers'
greedy output, streaming, overlapping requests, bad requests, placement, metrics."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import TINY_EOS, free_ports, hf_greedy


MODEL = "tiny"
LIMIT = 400  # the server's max_tokens limit; a LIMIT-token stream outlives a client disconnect


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir):
    from ray import serve

    from actors.serve import build_app

    port, = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"pipeline": {"model_dir": str(tiny_model_dir), "stages": 2}, "mode": "ppsd",
                         "model_name": MODEL, "max_tokens_limit": LIMIT, "max_ongoing_requests": 4}),
              name="ppsd", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from ppsd_ray.model import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def http(base: str, method: str, path: str, body=None, raw: bytes | None = None, headers=None):
    """(status, parsed JSON body) without raising on 4xx."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def expected_text(tokenizer, model_dir, ids, n):
    tokens = hf_greedy(model_dir, ids, n)
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body = http(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["stages"] == 2


def test_stages_run_in_the_replicas_placement_group(server, ray_cluster):
    """One PACK group per replica: bundle 0 the replica, bundles 1..K the stages, all in use."""
    import ray

    groups = [g for g in ray.util.placement_group_table().values()
              if g["name"].startswith("SERVE_REPLICA::ppsd#PPSDServer") and g["state"] == "CREATED"]
    assert len(groups) == 1
    pg = groups[0]
    assert pg["strategy"] == "PACK" and len(pg["bundles"]) == 3
    available = ray.available_resources()
    for i in range(3):  # every bundle's CPU is taken by its actor
        assert available.get(f"CPU_group_{i}_{pg['placement_group_id']}", 0) == 0


def test_completion_equals_hf_greedy(client, tokenizer, tiny_model_dir):
    from ppsd_ray.model import encode_prompt

    prompt = "the people of the world"
    ids = encode_prompt(tokenizer, prompt, raw=True)
    tokens, text = expected_text(tokenizer, tiny_model_dir, ids, 12)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == ("stop" if tokens[-1] == TINY_EOS else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), len(tokens), len(ids) + len(tokens))
    stats = r.model_extra["ppsd"]
    assert stats["mode"] == "ppsd" and stats["drafted"] > 0
    assert stats["accepted"] + stats["rollbacks"] == stats["drafted"]
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL

    # token ids as the prompt give the same answer
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=12)
    assert r2.choices[0].text == text


def test_chat_equals_hf_greedy_streaming_and_not(client, tokenizer, tiny_model_dir):
    from ppsd_ray.model import encode_prompt

    content = "what is the name of the sea"
    ids = encode_prompt(tokenizer, content)  # the chat template
    tokens, text = expected_text(tokenizer, tiny_model_dir, ids, 10)
    messages = [{"role": "user", "content": content}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens)
    assert r.object == "chat.completion"

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # token by token
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert final[0].model_extra["ppsd"]["drafted"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)

    # completions stream too, ending with [DONE] on the wire
    stream = list(client.completions.create(model=MODEL, prompt=content, max_tokens=6, stream=True))
    alone = client.completions.create(model=MODEL, prompt=content, max_tokens=6)
    assert "".join(c.choices[0].text for c in stream) == alone.choices[0].text
    assert stream[-1].choices[0].finish_reason == alone.choices[0].finish_reason


def test_sse_wire_format(server):
    req = urllib.request.Request(server + "/v1/completions", method="POST",
                                 data=json.dumps({"model": MODEL, "prompt": "the", "max_tokens": 3,
                                                  "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_finish_reason_stop_at_eos(client, tokenizer, tiny_model_dir):
    """A prompt whose greedy continuation reaches EOS: finish_reason "stop", EOS counted."""
    from ppsd_ray.model import encode_prompt

    for prompt in EOS_PROMPTS:
        ids = encode_prompt(tokenizer, prompt, raw=True)
        tokens = hf_greedy(tiny_model_dir, ids, 40)
        if tokens[-1] == TINY_EOS:
            break
    else:
        pytest.fail("no prompt reaches EOS: update EOS_PROMPTS for this tiny model")
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(tokens) < 40
    assert r.choices[0].text == tokenizer.decode(tokens, skip_special_tokens=True)


# words whose greedy continuation, as the whole raw prompt, is EOS on the seed-0 tiny model
EOS_PROMPTS = ["the to", "to", "be", "many"]


def test_overlapping_requests_do_not_mix(client):
    """Several requests at once, both endpoints, streaming and not: each answer equals the
    same request sent alone."""
    requests = [("chat", "the house of the mother", 24, False), ("chat", "why do we go", 24, True),
                ("completion", "one two three four", 24, True), ("completion", "what is", 24, False),
                ("chat", "school food children", 16, False), ("completion", "land of the sun", 20, True)]

    def send(kind, prompt, n, stream):
        if kind == "chat":
            messages = [{"role": "user", "content": prompt}]
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=n, stream=True) if c.choices)
            return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n).choices[0].message.content
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=n, stream=True))
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n).choices[0].text

    alone = [send(*r) for r in requests]
    together: list = [None] * len(requests)
    errors: list = []

    def run(i):
        try:
            together[i] = send(*requests[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert together == alone
    assert len(set(alone)) > 1  # the prompts really differ


GOOD = {"model": MODEL, "prompt": "the", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "the"}], "max_tokens": 2}

BAD = [  # (id, path, body or raw bytes, status, param or None, code or None)
    ("malformed-json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, None, None),
    ("not-an-object", "/v1/chat/completions", b'[1, 2]', 400, None, None),
    ("unknown-model", "/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("max-tokens-0", "/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", None),
    ("max-tokens-negative", "/v1/chat/completions", {**CHAT, "max_tokens": -5}, 400, "max_tokens", None),
    ("max-tokens-above-limit", "/v1/completions", {**GOOD, "max_tokens": LIMIT + 1}, 400, "max_tokens", None),
    ("max-completion-tokens-0", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens", None),
    ("prompt-longer-than-context", "/v1/completions", {**GOOD, "prompt": [5] * 600}, 400, "prompt",
     "context_length_exceeded"),
    ("prompt-plus-max-tokens-over-context", "/v1/completions", {**GOOD, "prompt": [5] * 400, "max_tokens": 150},
     400, "max_tokens", "context_length_exceeded"),
    ("chat-longer-than-context", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "the " * 600}]}, 400, "messages", "context_length_exceeded"),
    ("max-tokens-string", "/v1/completions", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens", None),
    ("max-tokens-float", "/v1/completions", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", None),
    ("prompt-number", "/v1/completions", {**GOOD, "prompt": 5}, 400, "prompt", None),
    ("stream-string", "/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream", None),
    ("messages-string", "/v1/chat/completions", {**CHAT, "messages": "hello"}, 400, "messages", None),
    ("empty-messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", None),
    ("message-without-role", "/v1/chat/completions", {**CHAT, "messages": [{"content": "the"}]}, 400,
     "messages.0.role", None),
    ("unknown-role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", None),
    ("empty-prompt", "/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt", None),
    ("token-id-out-of-vocab", "/v1/completions", {**GOOD, "prompt": [1, 99999]}, 400, "prompt", None),
    ("two-prompts", "/v1/completions", {**GOOD, "prompt": ["the", "a"]}, 400, "prompt", None),
    ("n-2", "/v1/completions", {**GOOD, "n": 2}, 400, "n", "unsupported_value"),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools", "unsupported_value"),
    ("response-format-json", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}},
     400, "response_format", "unsupported_value"),
    ("five-stop-strings", "/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("top-logprobs-6", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 6}, 400,
     "top_logprobs", None),
    ("temperature-negative", "/v1/chat/completions", {**CHAT, "temperature": -0.5}, 400, "temperature", None),
    ("unknown-field", "/v1/completions", {**GOOD, "frobnicate": True}, 400, "frobnicate", None),
    # issue #13: each of these once answered a plain-text 500 or a confusing message
    ("empty-body", "/v1/chat/completions", b"", 400, None, None),
    ("lone-surrogate", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
     400, "messages.0.content", None),
    ("lone-surrogate-in-a-key", "/v1/completions", b'{"prompt": "the", "\\udc00": 1}', 400, None, None),
    ("huge-max-tokens", "/v1/completions", {**GOOD, "max_tokens": 10**30}, 400, "max_tokens", "invalid_value"),
    ("max-tokens-of-5000-digits", "/v1/completions", b'{"prompt": "the", "max_tokens": 1' + b"0" * 5000 + b"}",
     400, None, None),
]


@pytest.mark.parametrize("path,body,status,param,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error_and_server_stays_up(server, client, path, body, status, param, code):
    raw = body if isinstance(body, bytes) else None
    got, err = http(server, "POST", path, body=None if raw else body, raw=raw)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param
    if code:
        assert err["error"]["code"] == code
    assert client.completions.create(**GOOD).usage.completion_tokens == 2  # still serving


def test_langchain_style_request(client):
    """What LangChain's ChatOpenAI sends: temperature 0.7, n=1, stop ["\n\n"], streaming with
    usage. The stream completes, and with a seed it equals the same request not streamed."""
    kwargs = {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "the house of the mother"}],
              "temperature": 0.7, "n": 1, "stop": ["\n\n"], "max_tokens": 12, "seed": 3}
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    alone = client.chat.completions.create(**kwargs)
    assert text and "\n\n" not in text
    assert text == alone.choices[0].message.content and finish == [alone.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == alone.usage.completion_tokens


def test_stop_strings(client):
    prompt = "the people of the world"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12)
    words = full.choices[0].text.split(" ")
    stop = " " + words[3]
    cut = full.choices[0].text[:full.choices[0].text.index(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stop=["zzz", stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens  # decoding stopped there
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"
    # the server keeps serving after the cancelled request
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=12).choices[0].text == \
        full.choices[0].text


def test_model_may_be_omitted(server):
    status, body = http(server, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 2})
    assert status == 200 and body["model"] == MODEL and body["usage"]["completion_tokens"] == 2


def test_openai_client_raises_its_error_types(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="the", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert e.value.param == "messages"


def test_unknown_path_is_404_with_openai_body(server):
    status, body = http(server, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


def test_client_disconnect_leaves_the_server_serving(server, client):
    """Closing a stream early: the replica cancels the request in the coordinator (how
    soon Serve notices the disconnect varies, so the cancel itself is tested below)."""
    stream = client.completions.create(model=MODEL, prompt="the world", max_tokens=LIMIT, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert client.completions.create(**GOOD).usage.completion_tokens == 2
    assert client.chat.completions.create(**CHAT).usage.completion_tokens == 2


def test_coordinator_cancel_stops_a_request_after_its_next_token(ray_cluster, tiny_model_dir, tokenizer):
    import ray

    from actors.pipeline import Pipeline
    from ppsd_ray import GenerationConfig, PipelineConfig
    from ppsd_ray.model import encode_prompt

    ids = encode_prompt(tokenizer, "the world", raw=True)
    pipe = Pipeline(PipelineConfig(model_dir=tiny_model_dir, stages=2))
    try:
        gen = GenerationConfig(max_new_tokens=400, stop_on_eos=False).model_dump(mode="json")
        got = []
        for ref in pipe.coordinator.generate.remote("seq-cancel", ids, gen):
            item = ray.get(ref)
            assert not isinstance(item, dict), "a cancelled request yields no stats"
            got.append(item)
            if len(got) == 3:
                ray.get(pipe.coordinator.cancel.remote("seq-cancel"))
        assert 3 <= len(got) < 400
        assert got == hf_greedy(tiny_model_dir, ids, len(got), stop_on_eos=False)
        ray.get(pipe.coordinator.cancel.remote("seq-cancel"))  # after the end: a no-op
        assert pipe.generate(ids, GenerationConfig(max_new_tokens=6)).token_ids == hf_greedy(tiny_model_dir, ids, 6)
    finally:
        pipe.shutdown()


def test_metrics_exported(server, client, ray_cluster):
    """The coordinator's metrics reach Ray's Prometheus endpoint on this node."""
    import ray

    client.completions.create(model=MODEL, prompt="the sea", max_tokens=8)
    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    wanted = ["ray_ppsd_tokens_total", "ray_ppsd_drafted_tokens_total", "ray_ppsd_accepted_tokens_total",
              "ray_ppsd_rollbacks_total", "ray_ppsd_stage_busy_seconds_total", "ray_ppsd_stage_stale_seconds_total",
              "ray_ppsd_prompt_tokens_total", "ray_ppsd_requests_running",
              "ray_ppsd_request_latency_seconds_bucket", "ray_ppsd_time_to_first_token_seconds_bucket",
              "ray_ppsd_draft_head_version", 'head_version="0"', 'status="cancelled"']
    deadline, text = time.time() + 40, ""
    while time.time() < deadline:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, (missing, [line for line in text.splitlines() if line.startswith("ray_ppsd_requests")])
    busy = [line for line in text.splitlines() if line.startswith("ray_ppsd_stage_busy_seconds_total{")]
    assert {'stage="0"' in line for line in busy} == {True, False}  # one series per stage
