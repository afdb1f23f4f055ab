"""The HTTP server of `python -m rrm_engine serve` (FastAPI + uvicorn), over one AsyncLLM and a Judge on it.

Routes (one APIRouter per family, in routes/)
  GET  /health                 200 {"status": "ok"}; 503 {"status": "dead", "error"} once the engine has died
  GET  /v1/models              the served model, OpenAI's list shape
  GET  /metrics                Prometheus (prometheus_client; names in prometheus.py)
  POST /v1/completions         OpenAI completions: prompt str | [str] | [ids] | [[ids]], n, logprobs, stream
  POST /v1/chat/completions    OpenAI chat: messages (the model's chat template), n, logprobs/top_logprobs, stream
  POST /v1/judge/compare       {"items": [{"query", "a", "b"} | [q, a, b]], "votes"?, "timeout"?, "errors"?, "texts"?}
  POST /v1/judge/rank          {"items": [{"query", "candidates"} | [q, [..]]], "method"?, ...}
  POST /get_reward, /reward    OpenRLHF's remote reward model shape (openrlhf.py)

Before anything is queued (limits.py): with an API key, every route but /health needs
`Authorization: Bearer <key>` (401); a body over --max-body-bytes gets 413; every number must be
finite and in range, and n, votes, items, prompts, candidates and stop strings within their caps
(400 with OpenAI's error shape, whose `param` names the field, as for any bad body or a prompt
longer than the context); work in flight past its bound gets 429 with Retry-After. Prompts are
tokenised in worker threads and judge requests run on the judge's loop, so /health answers while
anything runs. A failed engine step answers 500, a dead engine 503, both in the same shape; a
failed prompt of a completions list cancels the others. A client that disconnects has its
requests aborted: a plain request is watched while it runs, a stream is cancelled by the server
when its client goes. A judgment with an idempotency key (the `Idempotency-Key` header, the body's
`idempotency_key`; /get_reward: its body's hash) is the exception: a retry joins it, and it
outlives its client for a grace period (idempotency.py).
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..async_engine import EngineDeadError, RequestFailedError
from ..judge.judge import Judge
from .idempotency import Judgments, KeyConflict
from .limits import Gate, Limits, Overloaded, TooLarge
from .openai_api import BadField
from .openrlhf import OpenRLHFConfig
from .routes import ROUTERS
from .state import ClientGone, ServerState


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status,
                        headers=headers)


def _field_of(message: str) -> str | None:
    m = message.lower()
    if "item" in m and m.startswith("item "):
        return "items." + m.split()[1].rstrip(":")
    for name in ("max_tokens", "prompt", "stop", "logprob"):
        if name in m:
            return name
    return None


def _install_error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(TooLarge)
    async def _too_large(_: Request, exc: TooLarge) -> JSONResponse:
        return _error(413, str(exc), exc.field, kind="request_too_large")

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return _error(429, str(exc), kind="overloaded", headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(503, str(exc), kind="engine_dead")

    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, exc: RequestFailedError) -> JSONResponse:
        return _error(500, str(exc), kind="engine_step_failed")

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)


def build_app(judge: Judge, model_name: str, default_max_tokens: int = 256,
              openrlhf: OpenRLHFConfig | None = None, limits: Limits | None = None,
              api_key: str | None = None, judgments: Judgments | None = None) -> FastAPI:
    """The app over `judge` (and its engine). limits: the per-request caps and the bound on work in
    flight (limits.Limits; defaults there). api_key: every route but /health then needs
    `Authorization: Bearer <api_key>`; None serves without authentication (serve refuses that on a
    non-loopback --host unless told --allow-unauthenticated). judgments: where keyed judgments are
    kept (idempotency.Judgments: its TTL and grace period)."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty str or None")
    state = ServerState.create(judge, model_name, default_max_tokens, openrlhf, limits, judgments)
    app = FastAPI(title="rrm_engine", description="Reward Reasoning Model runtime")
    app.state.rrm = state
    _install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=state.limits.max_body_bytes,
                       on_done=state.metrics.request_done)
    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
