"""The server's routes, one APIRouter per family (as vLLM's entrypoints keep them): health.py
(/health, /v1/models, /metrics), openai.py (/v1/completions, /v1/chat/completions), judge.py
(/v1/judge/compare, /v1/judge/rank), openrlhf.py (/get_reward, /reward). Each reads the server's
shared state from request.app.state.rrm (state.py); server.py assembles them."""
from __future__ import annotations

from . import health, judge, openai, openrlhf

ROUTERS = (health.router, openai.router, judge.router, openrlhf.router)

__all__ = ["ROUTERS"]
