"""The OpenAI API without Ray: requests answered from a fake token stream (stop strings,
logprobs, streaming, sampling settings reaching GenerationConfig, refusals), and the
streaming detokeniser on its own."""
from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from actors.openai_api import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from actors.openai_serving import OpenAIServing
from ppsd_ray.config import GenerationConfig, Mode
from ppsd_ray.detokenize import StreamDetokenizer
from ppsd_ray.schedule import TokenLogprobs

from conftest import TINY_EOS


class ByteTokenizer:
    """Token i is the byte string PIECES[i]: a multi-byte character can span two tokens."""
    PIECES = [b"Hi", b" \xc3", b"\xa9", b"\n", b"\n\n", b"ok", b"</s>"]

    def decode(self, ids, skip_special_tokens=False):
        ids = [i for i in ids if not (skip_special_tokens and i == 6)]
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def feed_all(detok, ids) -> list[str]:
    return [detok.feed(i) for i in ids] + [detok.finish()]


def test_detokenizer_waits_out_half_decoded_characters():
    pieces = feed_all(StreamDetokenizer(ByteTokenizer()), [0, 1, 2, 5, 6])
    assert pieces == ["Hi", "", " \u00e9", "ok", "", ""]
    assert "".join(pieces) == ByteTokenizer().decode([0, 1, 2, 5, 6], skip_special_tokens=True)


def test_detokenizer_cuts_before_a_stop_string_and_holds_back_its_start():
    detok = StreamDetokenizer(ByteTokenizer(), stop=["\n\nok"])
    assert detok.feed(0) == "Hi"
    assert detok.feed(3) == ""  # "\n" could start "\n\nok"
    assert detok.feed(3) == ""  # "\n\n" too
    assert detok.feed(5) == "" and detok.stopped  # "\n\nok": cut, nothing of it shown
    assert detok.feed(0) == "" and detok.finish() == "" and detok.text == "Hi"

    detok = StreamDetokenizer(ByteTokenizer(), stop=["\n\nok"])
    assert feed_all(detok, [0, 3, 0]) == ["Hi", "", "\nHi", ""]  # held back, then released
    assert not detok.stopped
    detok = StreamDetokenizer(ByteTokenizer(), stop=["\n\n\n"])
    assert feed_all(detok, [0, 4]) == ["Hi", "", "\n\n"]  # what was held back comes out at the end


class FakeEngine:
    """The coordinator's stream: fixed tokens (TokenLogprobs when logprobs are asked for),
    then stats; records each GenerationConfig and whether the stream was closed early.
    With `broken_after`: after that many tokens it raises `failure`, or hangs when that is None."""

    def __init__(self, tokens: list[int], broken_after: int | None = None, failure: Exception | None = None):
        self.tokens, self.gens, self.closed_early = tokens, [], []
        self.broken_after, self.failure = broken_after, failure

    async def __call__(self, ids, gen: GenerationConfig):
        self.gens.append(gen)
        done = False
        try:
            for i, t in enumerate(self.tokens[:gen.max_new_tokens]):
                if i == self.broken_after:
                    if self.failure is None:
                        await asyncio.Event().wait()  # forever
                    raise self.failure
                if gen.logprobs is None:
                    yield t
                else:
                    lp = -0.5 - i  # the top alternative is the chosen token itself
                    yield TokenLogprobs(t, lp, tuple((t + k, lp - k) for k in range(gen.logprobs)))
            done = True
            yield {"drafted": 4, "accepted": 3, "acceptance_rate": 0.75, "rollbacks": 1, "tokens_per_s": 10.0}
        finally:
            self.closed_early.append(not done)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from ppsd_ray.model import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def serving(tokenizer, words: str, eos: bool = True, timeout_s: float = 60, **broken) -> tuple[OpenAIServing, FakeEngine]:
    engine = FakeEngine(tokenizer(words).input_ids + ([TINY_EOS] if eos else []), **broken)
    return OpenAIServing(tokenizer, "tiny", [TINY_EOS], 512, 400, Mode.ppsd, 2, engine, timeout_s), engine


def run(coro):
    return asyncio.run(coro)


def events(response) -> list:
    async def collect():
        return [e async for e in response.body_iterator]

    out = [e.removeprefix("data: ").strip() for e in run(collect())]
    assert out[-1] == "[DONE]"
    return [json.loads(e) for e in out[:-1]]


CHAT = {"messages": [{"role": "user", "content": "the"}]}


def test_stop_string_cuts_the_text_and_stops_the_request(tokenizer):
    api, engine = serving(tokenizer, "one two three four")
    r = run(api.chat(ChatCompletionRequest(**CHAT, stop=[" four", "zzz"], max_tokens=20)))
    assert r.choices[0].message.content == "one two three"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 4  # up to the token that completed the stop string
    assert engine.closed_early == [True] and r.ppsd is None  # cancelled: no stats come back

    stream = events(run(api.chat(ChatCompletionRequest(**CHAT, stop=" four", max_tokens=20, stream=True))))
    assert stream[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in stream) == "one two three"
    assert stream[-1]["choices"][0]["finish_reason"] == "stop"

    # no stop string met: all of the text, finish_reason from EOS or the length
    r = run(api.completions(CompletionRequest(prompt="the", stop=["\n\n"], max_tokens=20)))
    assert r.choices[0].text == "one two three four" and r.choices[0].finish_reason == "stop"
    assert r.ppsd.drafted == 4 and engine.closed_early[-1] is False
    r = run(api.completions(CompletionRequest(prompt="the", max_tokens=3)))
    assert r.choices[0].text == "one two three" and r.choices[0].finish_reason == "length"


def test_sampling_settings_reach_the_generation_config(tokenizer):
    api, engine = serving(tokenizer, "one two")
    run(api.chat(ChatCompletionRequest(**CHAT, temperature=0.7, top_p=0.9, top_k=40, seed=7, max_tokens=5)))
    run(api.completions(CompletionRequest(prompt="the", top_k=-1, max_tokens=5)))  # vLLM's "off"
    first, second = engine.gens
    assert (first.temperature, first.top_p, first.top_k, first.seed, first.max_new_tokens) == (0.7, 0.9, 40, 7, 5)
    assert (second.temperature, second.top_k, second.seed, second.logprobs) == (0, 0, None, None)


def test_chat_logprobs(tokenizer):
    api, _ = serving(tokenizer, "one two three", eos=False)
    r = run(api.chat(ChatCompletionRequest(**CHAT, logprobs=True, top_logprobs=2, max_tokens=3)))
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == ["one", "two", "three"]
    assert [c.logprob for c in content] == [-0.5, -1.5, -2.5]
    assert content[0].bytes == list(b"one")
    one = tokenizer("one").input_ids[0]
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [
        ("one", -0.5), (tokenizer.decode([one + 1]), -1.5)]

    r = run(api.chat(ChatCompletionRequest(**CHAT, logprobs=True, max_tokens=3)))
    assert [len(c.top_logprobs) for c in r.choices[0].logprobs.content] == [0, 0, 0]  # the chosen token only
    assert run(api.chat(ChatCompletionRequest(**CHAT, max_tokens=3))).choices[0].logprobs is None

    stream = events(run(api.chat(ChatCompletionRequest(**CHAT, logprobs=True, top_logprobs=1, max_tokens=3,
                                                       stream=True))))
    sent = [e["token"] for c in stream if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert sent == ["one", "two", "three"]  # each token's logprobs once, with its text


def test_completion_logprobs(tokenizer):
    api, _ = serving(tokenizer, "one two three", eos=False)
    r = run(api.completions(CompletionRequest(prompt="the", logprobs=2, max_tokens=3)))
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "one two three"
    assert lp.tokens == ["one", "two", "three"] and lp.token_logprobs == [-0.5, -1.5, -2.5]
    assert lp.text_offset == [0, 3, 7]  # where each token's text starts: "one| two| three"
    one = tokenizer("one").input_ids[0]
    assert lp.top_logprobs[0] == {"one": -0.5, tokenizer.decode([one + 1]): -1.5}
    r = run(api.completions(CompletionRequest(prompt="the", logprobs=0, max_tokens=3)))
    assert r.choices[0].logprobs.top_logprobs == [{"one": -0.5}, {"two": -1.5}, {"three": -2.5}]


BAD_BODIES = [  # (request model, body, param)
    (ChatCompletionRequest, {**CHAT, "temperature": -1}, "temperature"),
    (ChatCompletionRequest, {**CHAT, "top_p": 0}, "top_p"),
    (ChatCompletionRequest, {**CHAT, "top_k": -2}, "top_k"),
    (ChatCompletionRequest, {**CHAT, "top_logprobs": 6, "logprobs": True}, "top_logprobs"),
    (ChatCompletionRequest, {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (ChatCompletionRequest, {**CHAT, "stop": ""}, "stop"),
    (ChatCompletionRequest, {**CHAT, "seed": 2**63}, "seed"),
    (CompletionRequest, {"prompt": "the", "logprobs": 6}, "logprobs"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "a\ud800"}]}, "messages.0.content"),
    (CompletionRequest, {"prompt": "\udfff"}, "prompt"),
    (ChatCompletionRequest, {**CHAT, "metadata": {"k\ud800": "v"}}, "metadata"),
    (ChatCompletionRequest, {**CHAT, "functions": []}, "functions"),
]


@pytest.mark.parametrize("model,body,param", BAD_BODIES, ids=[b[2] + str(i) for i, b in enumerate(BAD_BODIES)])
def test_bad_fields_are_named(model, body, param):
    with pytest.raises(ValidationError) as e:
        model(**body)
    err = validation_error([{**x, "loc": ("body", *x["loc"])} for x in e.value.errors()])
    assert err.status == 400 and err.param == param
    json.dumps(err.body()).encode("utf-8")  # the answer itself is valid UTF-8


REFUSED = [
    ({**CHAT, "n": 2}, "n"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({**CHAT, "tool_choice": "required"}, "tool_choice"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({**CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ({**CHAT, "model": "gpt-4"}, "model"),
]


@pytest.mark.parametrize("body,param", REFUSED, ids=[r[1] for r in REFUSED])
def test_unsupported_settings_are_refused(tokenizer, body, param):
    api, engine = serving(tokenizer, "one")
    with pytest.raises(APIError) as e:
        run(api.chat(ChatCompletionRequest(**body)))
    assert e.value.param == param and e.value.status in (400, 404)
    assert engine.gens == []  # nothing was generated


def test_harmless_fields_are_accepted_and_model_may_be_omitted(tokenizer):
    api, engine = serving(tokenizer, "one two")
    body = {**CHAT, "response_format": {"type": "text"}, "store": False, "metadata": {"k": "v"},
            "service_tier": "auto", "parallel_tool_calls": True, "user": "u", "n": 1, "tool_choice": "none",
            "stream_options": {"include_usage": True, "include_obfuscation": False}, "max_tokens": 5}
    plain = run(api.chat(ChatCompletionRequest(**CHAT, max_tokens=5)))
    assert run(api.chat(ChatCompletionRequest(**body))).choices[0].message == plain.choices[0].message
    assert run(api.chat(ChatCompletionRequest(**body, model="tiny"))).model == "tiny"


def test_empty_body_and_non_object_name_the_problem():
    assert "no body" in validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required"}]).message
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate([1, 2])
    err = validation_error([{**x, "loc": ("body", *x["loc"])} for x in e.value.errors()])
    assert err.message == "The request body must be a JSON object."


def test_a_stream_closed_early_closes_the_token_stream(tokenizer):
    """A client that goes away: the coordinator's request is cancelled at once, not at GC."""
    api, engine = serving(tokenizer, "one two three four")

    async def read_two_then_close():
        response = await api.completions(CompletionRequest(prompt="the", max_tokens=4, stream=True))
        events = response.body_iterator
        [await events.__anext__() for _ in range(2)]
        await events.aclose()
        return list(engine.closed_early)

    assert run(read_two_then_close()) == [True]


def test_a_response_cancelled_while_it_sends_closes_the_token_stream(tokenizer):
    """Serve cancels the response of a client that went away, often while it waits in `send`:
    the request is cancelled then, not when the garbage collector finds the stream."""
    api, engine = serving(tokenizer, "one two three four")

    async def cancel_while_sending():
        response = await api.completions(CompletionRequest(prompt="the", max_tokens=4, stream=True))
        sent = []

        async def send(message):
            sent.append(message)
            if len(sent) == 3:  # the start, one chunk, then the client stops reading
                await asyncio.Event().wait()

        async def receive():
            await asyncio.Event().wait()

        task = asyncio.create_task(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
        while len(sent) < 3:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return list(engine.closed_early)

    assert run(cancel_while_sending()) == [True]


@pytest.mark.parametrize("failure", [RuntimeError("the pipeline's coordinator died"), None], ids=["dies", "hangs"])
def test_a_pipeline_that_fails_midway_ends_the_request_with_an_error_naming_the_tokens_done(tokenizer, failure):
    """Streaming: an error event, then [DONE]; not streaming: a 5xx with OpenAI's body. A pipeline
    that hangs is given up on after timeout_s (504), and its request is cancelled."""
    api, engine = serving(tokenizer, "one two three four", timeout_s=0.3, broken_after=2, failure=failure)
    status, code, reason = (500, None, "coordinator died") if failure else (504, "timeout", "no token for 0.3 s")

    stream = events(run(api.completions(CompletionRequest(prompt="the", max_tokens=20, stream=True))))
    assert "".join(c["choices"][0]["text"] for c in stream[:-1]) == "one two"
    error = stream[-1]["error"]
    assert error["type"] == "server_error" and error["code"] == code
    assert "after 2 tokens" in error["message"] and reason in error["message"]

    with pytest.raises(APIError) as e:
        run(api.chat(ChatCompletionRequest(**CHAT, max_tokens=20)))
    assert e.value.status == status and "after 2 tokens" in e.value.message and reason in e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    assert engine.closed_early == [True, True]  # the token stream was closed: the request cancelled
