"""POST /v1/completions and /v1/chat/completions (OpenAI's shapes, openai_api.py).

Order of a request, cheapest refusal first: the body's fields (finite, in range, within the caps:
400), the prompts' lengths in characters (a text that cannot fit the context is refused without
tokenising it), admission (429 past the bound of work in flight, 413 for a request larger than the
whole bound), tokenisation in a worker thread, max_tokens within the context, the engine's own
check; only then is anything queued. The answer is built in a worker thread too (decoding the
log-probs of many samples is CPU work)."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from ...sampling_params import SamplingParams
from ..limits import BadField, Ticket, cap, check_chars, check_sampling, fit_budget
from ..openai_api import (ChatRequest, CompletionRequest, chat_logprobs, chat_response, completion_logprobs,
                          completion_response, new_id)
from ...async_engine.tasks import all_or_none
from ..state import ServerState, arrival, state_of, watch
from .sse import sse

router = APIRouter(tags=["openai"])


def _admit(st: ServerState, ids: list[int], params: SamplingParams) -> None:
    st.judge.check_prompt(ids, params)  # the engine's own check, before anything is queued


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    st = state_of(request)
    st.check_alive()
    params = body.params()
    check_sampling(body, st.limits, st.vocab_size, st.max_model_len)
    raw = body.prompts()
    cap("prompt", len(raw), st.limits.max_prompts, "--max-prompts")
    for i, p in enumerate(raw):
        field = "prompt" if len(raw) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            check_chars(field, len(p), st.chars_per_token, st.max_model_len)
        elif st.max_model_len is not None and len(p) >= st.max_model_len:  # before the engine reads every id
            raise BadField(field, f"{field} of {len(p)} token ids does not fit the model's context of "
                                  f"{st.max_model_len} tokens (it must leave room for one generated token)")
    ticket = st.admission.reserve(len(raw) * params.n * params.max_tokens, "completion request")
    try:
        prompts = [await st.encode(p) if isinstance(p, str) else list(p) for p in raw]
        for ids in prompts:
            fit_budget("max_tokens", len(ids), params.max_tokens, params.max_tokens, st.max_model_len)
            _admit(st, ids, params)
        rid = new_id("cmpl")
        rids = [f"{rid}-{i}" for i in range(len(prompts))]
        if body.stream:
            streams = _open_streams(st, prompts, rids, params)
            st.metrics.queue.observe(time.perf_counter() - arrival(request))
            return sse(_completion_chunks(st, request, rid, streams, params.n), _ender(ticket, streams))
        st.metrics.queue.observe(time.perf_counter() - arrival(request))
        outs = await watch(request, all_or_none(st.engine.generate(ids, params, request_id=r)
                                                for ids, r in zip(prompts, rids)),
                           lambda: [st.engine.abort(r) for r in rids])
    except BaseException:
        ticket.release()
        raise
    ticket.release()
    return await asyncio.to_thread(completion_response, rid, st.model_name, list(outs), st.tok)


async def _completion_chunks(st: ServerState, request: Request, rid: str, streams: list[Any],
                             n: int) -> AsyncIterator[dict]:
    async for i, c in _timed(st, request, _merged(streams)):
        yield {"id": rid, "object": "text_completion", "created": int(time.time()), "model": st.model_name,
               "choices": [{"index": i * n + c.index, "text": c.text,
                            "logprobs": completion_logprobs(st.tok, c.token_ids, c.logprobs),
                            "finish_reason": c.finish_reason}]}


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request) -> Any:
    st = state_of(request)
    st.check_alive()
    params = body.params(st.default_max_tokens)
    check_sampling(body, st.limits, st.vocab_size, st.max_model_len)
    messages = body.chat()
    check_chars("messages", sum(len(m["content"]) for m in messages), st.chars_per_token, st.max_model_len)
    explicit = body.max_completion_tokens or body.max_tokens
    ticket = st.admission.reserve(params.n * params.max_tokens, "chat request")
    try:
        text = await asyncio.to_thread(_template, st, messages)
        ids = await st.encode(text, add_special_tokens=False)  # the template holds any BOS already
        budget = fit_budget("max_completion_tokens" if body.max_completion_tokens else "max_tokens", len(ids),
                            explicit, st.default_max_tokens, st.max_model_len)
        if budget != params.max_tokens:
            params = dataclasses.replace(params, max_tokens=budget)
        _admit(st, ids, params)
        rid = new_id("chatcmpl")
        top = body.top_logprobs or 0
        if body.stream:
            streams = _open_streams(st, [ids], [rid], params)
            st.metrics.queue.observe(time.perf_counter() - arrival(request))
            return sse(_chat_chunks(st, request, rid, streams, top), _ender(ticket, streams))
        st.metrics.queue.observe(time.perf_counter() - arrival(request))
        out = await watch(request, st.engine.generate(ids, params, request_id=rid), lambda: st.engine.abort(rid))
    except BaseException:
        ticket.release()
        raise
    ticket.release()
    return await asyncio.to_thread(chat_response, rid, st.model_name, out, st.tok, top)


def _ender(ticket: Ticket, streams: list[Any]) -> Any:
    """What runs when a stream's response ends, however it ends (even if it never started: the
    client went away before the first byte): its streams closed (aborting what still runs) and its
    share of the admission bound given back."""
    def end() -> None:
        for s in streams:
            s.close()
        ticket.release()
    return end


def _template(st: ServerState, messages: list[dict[str, str]]) -> str:
    with st.encode_lock:
        return st.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


async def _chat_chunks(st: ServerState, request: Request, rid: str, streams: list[Any],
                       top: int) -> AsyncIterator[dict]:
    started: set[int] = set()
    async for _, c in _timed(st, request, _merged(streams)):
        delta: dict[str, Any] = {} if c.index in started else {"role": "assistant"}
        started.add(c.index)
        delta["content"] = c.text
        yield {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": st.model_name,
               "choices": [{"index": c.index, "delta": delta, "logprobs": chat_logprobs(st.tok, c.token_ids,
                                                                                        c.logprobs, top),
                            "finish_reason": c.finish_reason}]}


def _open_streams(st: ServerState, prompts: list[list[int]], rids: list[str], params: SamplingParams) -> list[Any]:
    """Submit every prompt now (so that a refusal is an HTTP error, not a broken stream)."""
    streams: list[Any] = []
    try:
        for ids, r in zip(prompts, rids):
            streams.append(st.engine.stream(ids, params, request_id=r))
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


async def _timed(st: ServerState, request: Request, items: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Pass the stream's items on, observing the time to the first token and the time per token after
    it (per request: its longest sample's tokens over the time from its first token to its last)."""
    t0 = arrival(request)
    first = last = None
    counts: dict[tuple[int, int], int] = {}
    try:
        async for i, c in items:
            if c.token_ids:
                last = time.perf_counter()
                if first is None:
                    first = last
                    st.metrics.ttft.observe(first - t0)
                counts[(i, c.index)] = counts.get((i, c.index), 0) + len(c.token_ids)
            yield i, c
    finally:
        longest = max(counts.values(), default=0)
        if first is not None and last is not None and longest > 1:
            st.metrics.tpot.observe((last - first) / (longest - 1))


async def _merged(streams: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, what is new for one sample) from every prompt's stream as it comes (the
    AsyncLLM's stream items hold what is new per sample, stop strings held back); a sample's
    finish_reason is set on its last item. A failed prompt, or the client going away (cancelled),
    closes every stream, which aborts their requests."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Any) -> None:
        done: set[int] = set()  # items after a sample's end repeat its finish_reason
        try:
            async for out in stream:
                for c in out.outputs:
                    if c.index not in done and (c.text or c.token_ids or c.finish_reason is not None):
                        if c.finish_reason is not None:
                            done.add(c.index)
                        await queue.put((i, c))
        except Exception as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()

