"""`python -m rrm_engine serve`: load the model once and serve it over HTTP (see server.py for the routes).

  python -m rrm_engine serve --model embedded --port 8000 --votes 4 --max-tokens 2048
"""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the model over HTTP: OpenAI routes, judge routes, OpenRLHF reward",
                       description="OpenAI-compatible completions and chat, /v1/judge/compare and /v1/judge/rank, "
                                   "OpenRLHF's remote reward model (/get_reward), /metrics, /health.")
    p.add_argument("--model", default="embedded", help='"embedded", an HF model dir or a .gguf file')
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--served-model-name", default=None, help="the model id in /v1/models (default: --model)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="chat requests that set no max_tokens")
    g = p.add_argument_group("judge (the /v1/judge routes and the OpenRLHF reward)")
    g.add_argument("--votes", type=int, default=1)
    g.add_argument("--max-tokens", type=int, default=8192, help="max generated tokens per vote")
    g.add_argument("--thinking-budget", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--swap", choices=("random", "split", "none"), default="random")
    g.add_argument("--strict", action="store_true", help="paper-faithful: nothing forced")
    g.add_argument("--force", choices=("truncated", "invalid", "never"), default=None,
                   help="which votes without a verdict get one from log-probs (default: truncated)")
    g.add_argument("--adaptive", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--rm-method", choices=("knockout", "elo"), default="knockout",
                   help="OpenRLHF reward: how responses to one prompt are ranked when there is no label")
    g.add_argument("--invalid-reward", type=float, default=0.0, help="OpenRLHF reward of an unjudgeable response")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from ..judge.judge import Judge
    from .openrlhf import OpenRLHFConfig
    from .server import build_app, run_server

    llm_kwargs: dict[str, Any] = {}
    if args.device is not None:
        llm_kwargs["device"] = args.device
    if args.dtype is not None:
        import torch

        llm_kwargs["dtype"] = getattr(torch, args.dtype)
    if args.kv_cache_tokens is not None:
        llm_kwargs["kv_cache_tokens"] = args.kv_cache_tokens
    judge = Judge.from_pretrained(args.model, votes=args.votes, max_tokens=args.max_tokens,
                                  thinking_budget=args.thinking_budget, temperature=args.temperature,
                                  top_p=args.top_p, swap=args.swap, strict=args.strict, force=args.force,
                                  adaptive=args.adaptive, seed=args.seed, **llm_kwargs)
    app = build_app(judge, args.served_model_name or str(args.model), args.default_max_tokens,
                    OpenRLHFConfig(method=args.rm_method, invalid_reward=args.invalid_reward))
    run_server(app, args.host, args.port, args.log_level)
    judge.engine.shutdown()
    return 0
