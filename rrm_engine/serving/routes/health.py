"""GET /health, /v1/models, /metrics."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..state import state_of

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 {"status": "ok"} while the engine serves; 200 {"status": "degraded", "error"} while a
    replica of a data-parallel server is missing (it still serves; the replica is being restarted);
    503 {"status": "dead", "error"} once its loop has died or was shut down, or no replica is left (a
    load balancer then takes the server out). Needs no API key."""
    status, problem = state_of(request).health()
    if status == "dead":
        return JSONResponse({"status": "dead", "error": problem}, 503)
    if status == "degraded":
        return JSONResponse({"status": "degraded", "error": problem})
    return JSONResponse({"status": "ok"})


@router.get("/v1/models")
async def models(request: Request) -> dict:
    name = state_of(request).model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "rrm_engine"}]}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    # in a worker thread: a data-parallel server reads its replicas' metrics over Ray
    body, content_type = await asyncio.to_thread(state_of(request).metrics.render)
    return Response(body, media_type=content_type)
