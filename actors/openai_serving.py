"""Answers OpenAI requests from a token stream: prompts to ids, ids back to text, stop
strings, logprobs, streaming. No Ray here: actors/serve.py hands in the stream (the
coordinator's), tests a fake one. Every wait for the next token has a deadline, and a
request that fails midway tells the client what failed and how many tokens were done."""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from ppsd_ray.config import GenerationConfig, Mode, describe
from ppsd_ray.detokenize import StreamDetokenizer
from ppsd_ray.model import encode_chat, encode_prompt
from ppsd_ray.schedule import TokenLogprobs

from .openai_api import (APIError, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                         ChatCompletionRequest, ChatLogprobs, ChatMessageOut, ChatTokenLogprob, Completion,
                         CompletionChoice, CompletionLogprobs, CompletionRequest, Delta, PPSDStats, TopLogprob,
                         Usage, RequestBase, sse)

# prompt ids and a GenerationConfig in; token ids (TokenLogprobs with logprobs) then one stats dict out
# token ids (or TokenLogprobs), then the stats dict; None while the request waits for admission
TokenSource = Callable[[list[int], GenerationConfig], AsyncIterator[int | TokenLogprobs | dict | None]]


@dataclass
class _Generated:
    """What one request has produced so far."""
    detok: StreamDetokenizer
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[TokenLogprobs, int]] = field(default_factory=list)  # (item, text offset)
    stats: dict | None = None

    def add(self, item: int | TokenLogprobs) -> str:
        token = item.token if isinstance(item, TokenLogprobs) else item
        if isinstance(item, TokenLogprobs):
            self.logprobs.append((item, self.detok.decoded_length))
        self.tokens.append(token)
        return self.detok.feed(token)


class _StreamingResponse(StreamingResponse):
    """Closes its body however the response ends. A client that goes away cancels the response,
    often while it sends; Starlette then leaves the body, and with it the request in the
    pipeline, to the garbage collector."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class OpenAIServing:
    def __init__(self, tokenizer, model_id: str, eos_token_ids, context: int, max_tokens_limit: int,
                 mode: Mode, stages: int, tokens: TokenSource, timeout_s: float):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.eos = frozenset(eos_token_ids)
        self.context = context
        self.max_tokens_limit = min(max_tokens_limit, context - 1)
        self.mode, self.stages = mode, stages
        self.tokens = tokens
        self.timeout_s = timeout_s  # the longest wait for the next token
        self.created = int(time.time())

    # -- endpoints

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "ppsd-ray"}

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_id}`.",
                           param="model", code="model_not_found")

    async def completions(self, body: CompletionRequest):
        self._check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is served", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode_prompt(self.tokenizer, prompt, raw=True)
        else:
            ids = list(prompt)
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        max_tokens = self._max_tokens(body.max_tokens, "max_tokens", len(ids), "prompt")
        return await self._respond(body, ids, self._generation(body, max_tokens, body.logprobs), chat=False)

    async def chat(self, body: ChatCompletionRequest):
        self._check(body)
        if not body.messages:
            raise APIError(400, "messages: must hold at least one message", param="messages")
        ids = self._encode_chat(body)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self._max_tokens(requested, param, len(ids), "messages")
        return await self._respond(body, ids, self._generation(body, max_tokens, body.logprobs_count()), chat=True)

    # -- request checks

    def _check(self, body: RequestBase) -> None:
        self.check_model(body.model)
        refused = body.refused()
        if refused:
            raise refused

    def _encode_chat(self, body: ChatCompletionRequest) -> list[int]:
        messages = body.messages
        if len(messages) == 1 and messages[0].role == "user":  # exactly ppsd generate's prompt
            return encode_prompt(self.tokenizer, messages[0].text())
        if not self.tokenizer.chat_template:
            raise APIError(400, "the model has no chat template: send one user message", param="messages")
        try:
            return encode_chat(self.tokenizer, [{"role": m.role, "content": m.text()} for m in messages])
        except Exception as e:  # the template refused the conversation (roles, order, ...)
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None

    def _max_tokens(self, requested: int | None, param: str, prompt_len: int, prompt_param: str) -> int:
        if prompt_len == 0:
            raise APIError(400, f"{prompt_param}: the prompt is empty", param=prompt_param)
        if prompt_len >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; "
                                f"the prompt has {prompt_len}.", param=prompt_param, code="context_length_exceeded")
        if requested is None:
            return min(self.max_tokens_limit, self.context - prompt_len)
        if requested < 1:
            raise APIError(400, f"{param}: {requested} is less than the minimum of 1", param=param,
                           code="invalid_value")
        if requested > self.max_tokens_limit:
            raise APIError(400, f"{param}: {requested} is greater than this server's limit of "
                                f"{self.max_tokens_limit}", param=param, code="invalid_value")
        if prompt_len + requested > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt "
                                f"({prompt_len}) plus {param} ({requested}) exceeds it.", param=param,
                           code="context_length_exceeded")
        return requested

    def _generation(self, body: RequestBase, max_tokens: int, logprobs: int | None) -> GenerationConfig:
        try:
            return GenerationConfig(mode=self.mode, max_new_tokens=max_tokens, logprobs=logprobs, **body.sampling())
        except ValidationError as e:  # the request types carry the same limits; kept as a net
            raise APIError(400, describe(e), param=str(e.errors()[0]["loc"][0])) from None

    # -- responses

    async def _generate(self, ids: list[int], gen: GenerationConfig, out: _Generated) -> AsyncIterator[str]:
        """Feeds `out` and yields each piece of text as it becomes safe to show. Stops the
        request (closing the token stream cancels it) as soon as a stop string appears, or
        when no token came for timeout_s (a 504 APIError) while it was admitted."""
        async with aclosing(self.tokens(ids, gen)) as items:
            while True:
                try:
                    item = await asyncio.wait_for(anext(items), self.timeout_s)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise APIError(504, f"timed out after {len(out.tokens)} tokens: the pipeline sent no token "
                                        f"for {self.timeout_s:g} s", type="server_error", code="timeout") from None
                if item is None:  # still waiting for a slot: its deadline is not running yet
                    continue
                if isinstance(item, dict):
                    out.stats = item
                    continue
                text = out.add(item)
                if text:
                    yield text
                if out.detok.stopped:
                    return

    @staticmethod
    def _failure(e: Exception, out: _Generated) -> APIError:
        """A request that failed midway: the error says how many tokens were done."""
        if isinstance(e, APIError):
            return e
        return APIError(500, f"generation failed after {len(out.tokens)} tokens: {e}", type="server_error")

    def _finish_reason(self, out: _Generated) -> str:
        """"stop" at a stop string or EOS, else the max_tokens limit ended it."""
        return "stop" if out.detok.stopped or (out.tokens and out.tokens[-1] in self.eos) else "length"

    def _usage(self, ids: list[int], out: _Generated) -> Usage:
        return Usage(prompt_tokens=len(ids), completion_tokens=len(out.tokens),
                     total_tokens=len(ids) + len(out.tokens))

    def _ppsd(self, out: _Generated) -> PPSDStats | None:
        """None when the request was stopped early (a stop string): the coordinator sends no stats then."""
        if out.stats is None:
            return None
        s = out.stats
        return PPSDStats(mode=self.mode.value, stages=self.stages, drafted=s.get("drafted", 0),
                         accepted=s.get("accepted", 0), acceptance_rate=s.get("acceptance_rate", 0.0),
                         rollbacks=s.get("rollbacks", 0), tokens_per_s=s.get("tokens_per_s", 0.0),
                         head_version=s.get("head_version"))

    async def _respond(self, body: RequestBase, ids: list[int], gen: GenerationConfig, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        out = _Generated(StreamDetokenizer(self.tokenizer, body.stop_strings()))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream(rid, ids, gen, out, chat, include_usage)
            return _StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async with aclosing(self._generate(ids, gen, out)) as texts:
                async for _ in texts:
                    pass
        except Exception as e:
            raise self._failure(e, out) from None
        text = out.detok.text + out.detok.finish()
        logprobs = self._logprobs(out.logprobs, chat, len(text)) if gen.logprobs is not None else None
        common = {"id": rid, "created": int(time.time()), "model": self.model_id,
                  "usage": self._usage(ids, out), "ppsd": self._ppsd(out)}
        finish = self._finish_reason(out)
        if chat:
            return ChatCompletion(**common, choices=[ChatChoice(
                message=ChatMessageOut(content=text), logprobs=logprobs, finish_reason=finish)])
        return Completion(**common, choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)])

    async def _stream(self, rid: str, ids: list[int], gen: GenerationConfig, out: _Generated, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        model = ChatCompletionChunk if chat else Completion
        shown = 0  # logprobs already sent

        def chunk(text: str | None, finish: str | None = None, role: bool = False, **extra) -> str:
            nonlocal shown
            logprobs = None
            if gen.logprobs is not None and not role:
                logprobs = self._logprobs(out.logprobs[shown:], chat, len(out.detok.text))
                shown = len(out.logprobs)
            if chat:
                choice = ChatChunkChoice(delta=Delta(role="assistant" if role else None, content=text),
                                         logprobs=logprobs, finish_reason=finish)
            else:
                choice = CompletionChoice(text=text or "", logprobs=logprobs, finish_reason=finish)
            return sse(model(id=rid, created=created, model=self.model_id, choices=[choice], **extra))

        if chat:
            yield chunk("", role=True)
        try:  # closing the stream (a client that went away) closes the token stream at once
            async with aclosing(self._generate(ids, gen, out)) as texts:
                async for text in texts:
                    yield chunk(text)
        except Exception as e:
            yield sse(self._failure(e, out).body())
            yield sse("[DONE]")
            return
        yield chunk(out.detok.finish() or None, finish=self._finish_reason(out), ppsd=self._ppsd(out))
        if include_usage:
            yield sse(model(id=rid, created=created, model=self.model_id, choices=[], usage=self._usage(ids, out)))
        yield sse("[DONE]")

    def _logprobs(self, items: list[tuple[TokenLogprobs, int]], chat: bool,
                  text_length: int) -> ChatLogprobs | CompletionLogprobs:
        """OpenAI's logprobs for these tokens; a token's text is its own decoding. The
        completions API's text_offset is where the token's text starts in the answer."""
        def piece(token: int) -> str:
            return self.tokenizer.decode([token])

        if chat:
            def entry(token: int, logprob: float) -> dict:
                text = piece(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            return ChatLogprobs(content=[
                ChatTokenLogprob(**entry(item.token, item.logprob),
                                 top_logprobs=[TopLogprob(**entry(t, lp)) for t, lp in item.top])
                for item, _ in items])
        return CompletionLogprobs(
            tokens=[piece(item.token) for item, _ in items],
            token_logprobs=[item.logprob for item, _ in items],
            # vLLM's shape: the chosen token is always among its own alternatives
            top_logprobs=[{piece(t): lp for t, lp in ((item.token, item.logprob), *item.top)} for item, _ in items],
            text_offset=[min(offset, text_length) for _, offset in items])
