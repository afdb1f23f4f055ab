"""The HTTP server of `python -m rrm_engine serve` (FastAPI + uvicorn), over one AsyncLLM and a Judge on it.

Routes
  GET  /health                 {"status": "ok"}
  GET  /v1/models              the served model, OpenAI's list shape
  GET  /metrics                Prometheus text: prompt / prefill / cached / generated tokens, queue
                               depth, KV use, judge votes by kind
  POST /v1/completions         OpenAI completions: prompt str | [str] | [ids] | [[ids]], n, logprobs, stream
  POST /v1/chat/completions    OpenAI chat: messages (the model's chat template), n, logprobs/top_logprobs, stream
  POST /v1/judge/compare       {"items": [{"query", "a", "b"} | [q, a, b]], "votes"?, "timeout"?, "errors"?, "texts"?}
  POST /v1/judge/rank          {"items": [{"query", "candidates"} | [q, [..]]], "method"?, ...}
  POST /get_reward, /reward    OpenRLHF's remote reward model shape (openrlhf.py)

Bad input is answered before anything runs: 400 with OpenAI's error shape, whose `param` names the
field (a body that does not parse, a setting out of range, a prompt longer than the context or than
the KV pool holds). A failed engine step answers 500, a dead engine 503, both in the same shape. A
client that disconnects has its requests aborted: a plain request is watched while it runs, a
stream is cancelled by the server when its client goes. A judgment with an idempotency key (the
`Idempotency-Key` header, the body's `idempotency_key`; /get_reward: its body's hash) is the exception:
a retry joins it, and it outlives its client for a grace period (idempotency.py).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..judge.judge import Judge
from ..judge.results import comparison_to_dict, ranking_to_dict, vote_stats
from ..sampling_params import SamplingParams
from . import prometheus
from .judge_api import CompareBody, OpenRLHFBody, RankBody
from .openai_api import (BadField, ChatRequest, CompletionRequest, chat_logprobs, chat_response,
                         completion_logprobs, completion_response, new_id)
from ..async_engine import EngineDeadError, RequestFailedError
from .openrlhf import OpenRLHFConfig, openrlhf_rewards
from .idempotency import Judgments, KeyConflict


class ClientGone(Exception):
    """The client disconnected while its request ran; its engine requests were aborted."""


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _field_of(message: str) -> str | None:
    m = message.lower()
    if "item" in m and m.startswith("item "):
        return "items." + m.split()[1].rstrip(":")
    for name in ("max_tokens", "prompt", "stop", "logprob"):
        if name in m:
            return name
    return None


async def watch(request: Request, work: Awaitable[Any], on_disconnect: Callable[[], None] | None = None) -> Any:
    """Await `work`; if the client goes away first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                task.add_done_callback(_consume)  # its CancelledError has nobody to go to
                if on_disconnect is not None:
                    on_disconnect()
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def build_app(judge: Judge, model_name: str, default_max_tokens: int = 256,
              openrlhf: OpenRLHFConfig | None = None, judgments: Judgments | None = None) -> FastAPI:
    engine = judge.engine
    tok = engine.tokenizer
    rlhf = openrlhf or OpenRLHFConfig()
    served = {"valid": 0, "forced": 0, "invalid": 0, "comparisons": 0}
    app = FastAPI(title="rrm_engine", description="Reward Reasoning Model runtime")
    keyed = judgments if judgments is not None else Judgments()  # idempotency keys of the judge routes

    # ------------------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = ".".join(loc) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        return _error(400, msg, field)

    @app.exception_handler(BadField)
    async def _bad_field(_: Request, exc: BadField) -> JSONResponse:
        return _error(400, str(exc), exc.field)

    @app.exception_handler(ValueError)
    async def _bad_value(_: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc), _field_of(str(exc)))

    @app.exception_handler(KeyConflict)
    async def _key_conflict(_: Request, exc: KeyConflict) -> JSONResponse:
        return _error(409, str(exc), "idempotency_key")

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(503, str(exc), kind="engine_dead")

    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, exc: RequestFailedError) -> JSONResponse:
        return _error(500, str(exc), kind="engine_step_failed")

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)

    # ------------------------------------------------------------------------------ plain
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "rrm_engine"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus.render(engine.metrics(), served) + keyed.prometheus(),
                                 media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------------ generation
    def encode(prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return list(tok(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        return list(prompt)

    def admit(ids: list[int], params: SamplingParams) -> None:
        judge._validate(ids, params)  # the engine's own check, before anything is queued

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        params = body.params()
        prompts = [encode(p) for p in body.prompts()]
        for ids in prompts:
            admit(ids, params)
        rid = new_id("cmpl")
        rids = [f"{rid}-{i}" for i in range(len(prompts))]
        if body.stream:
            return _sse(_completion_chunks(rid, open_streams(prompts, rids, params), params.n))
        outs = await watch(request, asyncio.gather(*(engine.generate(ids, params, request_id=r)
                                                     for ids, r in zip(prompts, rids))),
                           lambda: [engine.abort(r) for r in rids])
        return completion_response(rid, model_name, list(outs), tok)

    async def _completion_chunks(rid: str, streams: list[Any], n: int) -> AsyncIterator[dict]:
        async for i, c in _merged(streams):
            yield {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                   "choices": [{"index": i * n + c.index, "text": c.text,
                                "logprobs": completion_logprobs(tok, c.token_ids, c.logprobs),
                                "finish_reason": c.finish_reason}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        params = body.params(default_max_tokens)
        text = tok.apply_chat_template(body.chat(), add_generation_prompt=True, tokenize=False)
        ids = encode(text, add_special_tokens=False)  # the template holds any BOS already
        admit(ids, params)
        rid = new_id("chatcmpl")
        top = body.top_logprobs or 0
        if body.stream:
            return _sse(_chat_chunks(rid, open_streams([ids], [rid], params), top))
        out = await watch(request, engine.generate(ids, params, request_id=rid), lambda: engine.abort(rid))
        return chat_response(rid, model_name, out, tok, top)

    async def _chat_chunks(rid: str, streams: list[Any], top: int) -> AsyncIterator[dict]:
        started: set[int] = set()
        async for _, c in _merged(streams):
            delta: dict[str, Any] = {} if c.index in started else {"role": "assistant"}
            started.add(c.index)
            delta["content"] = c.text
            yield {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                   "choices": [{"index": c.index, "delta": delta, "logprobs": chat_logprobs(tok, c.token_ids, c.logprobs, top),
                                "finish_reason": c.finish_reason}]}

    def open_streams(prompts: list[list[int]], rids: list[str], params: SamplingParams) -> list[Any]:
        """Submit every prompt now (so that a refusal is an HTTP error, not a broken stream)."""
        streams: list[Any] = []
        try:
            for ids, r in zip(prompts, rids):
                streams.append(engine.stream(ids, params, request_id=r))
        except BaseException:
            for st in streams:
                st.close()
            raise
        return streams

    async def _merged(streams: list[Any]) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, what is new for one sample) from every prompt's stream as it comes (the
        AsyncLLM's stream items hold what is new per sample, stop strings held back); a sample's
        finish_reason is set on its last item. Cancelled (the client went away), it closes the
        streams, which aborts their requests."""
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

        tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
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
            for st in streams:
                st.close()

    # ------------------------------------------------------------------------------- judge
    def count(comparisons: list[Any]) -> dict:
        s = vote_stats(comparisons)
        for k in ("valid", "forced", "invalid", "comparisons"):
            served[k] += int(s[k])
        return s

    @app.post("/v1/judge/compare")
    async def judge_compare(body: CompareBody, request: Request) -> dict:
        triples = body.triples()
        out = await watch(request, keyed.work(
            request.headers, "compare", body.model_dump(),
            lambda: judge.acompare_batch(triples, votes=body.votes, errors=body.errors, timeout=body.timeout)))
        return {"results": [comparison_to_dict(c, body.texts) for c in out], "stats": count(out)}

    @app.post("/v1/judge/rank")
    async def judge_rank(body: RankBody, request: Request) -> dict:
        pairs = body.pairs()
        out = await watch(request, keyed.work(
            request.headers, "rank", body.model_dump(),
            lambda: judge.arank_batch(pairs, method=body.method, votes=body.votes, errors=body.errors,
                                      timeout=body.timeout)))
        return {"results": [ranking_to_dict(r, body.texts) for r in out],
                "stats": count([m.comparison for r in out for m in r.matches])}

    async def openrlhf_route(body: OpenRLHFBody, request: Request) -> dict:
        return await watch(request, keyed.work(
            request.headers, "get_reward", body.model_dump(),
            lambda: openrlhf_rewards(judge, body.query, body.prompts, body.labels, rlhf), by_hash=rlhf.idempotent))

    app.post("/get_reward")(openrlhf_route)
    app.post("/reward")(openrlhf_route)
    return app


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except Exception as e:  # after the 200 header: report in the stream, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': type(e).__name__}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
