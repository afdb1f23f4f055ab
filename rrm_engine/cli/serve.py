"""`python -m rrm_engine serve`: load the model once and serve it over HTTP (see server.py for the routes).
A CLI plugin (rrm_engine/cli/main.py, PLUGINS): the model and judge options are the judging commands' own.

  python -m rrm_engine serve --model embedded --port 8000 --votes 4 --max-tokens 2048
"""
from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .main import JUDGE_OPTIONS, _add, add_llm_options, positive_int

    p = subparsers.add_parser(
        "serve", help="serve the model over HTTP: OpenAI routes, judge routes, OpenRLHF reward",
        description="OpenAI-compatible completions and chat, /v1/judge/compare and /v1/judge/rank, OpenRLHF's "
                    "remote reward model (/get_reward), /metrics, /health. Needs the serve extra: "
                    "pip install 'rrm_engine[serve]'.")
    add_llm_options(p)
    g = p.add_argument_group("judge (the /v1/judge routes and the OpenRLHF reward)")
    _add(g, JUDGE_OPTIONS)
    g.add_argument("--force", choices=("truncated", "invalid", "never"), default=None,
                   help="which votes without a verdict get one from log-probs (default: truncated; --strict: never)")
    g.add_argument("--rm-method", choices=("knockout", "elo"), default="knockout",
                   help="OpenRLHF reward: how responses to one prompt are ranked when there is no label")
    g.add_argument("--invalid-reward", type=float, default=0.0, help="OpenRLHF reward of an unjudgeable response")
    g.add_argument("--rm-timeout", type=float, default=170.0,
                   help="OpenRLHF reward: seconds a /get_reward judgment may run; what is not judged by then gets "
                        "--invalid-reward (default 170, under OpenRLHF's 180 s client timeout; 0: none)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=positive_int, default=8000)
    s.add_argument("--served-model-name", default=None, help="the model id in /v1/models (default: --model)")
    s.add_argument("--default-max-tokens", type=positive_int, default=256,
                   help="chat requests that set no max_tokens (default 256)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        from ..serving.server import build_app, run_server
    except ImportError as e:
        raise ValueError(f"serve needs the serve extra: pip install 'rrm_engine[serve]' ({e})") from None
    from .main import JUDGE_OPTIONS, _kwargs, llm_kwargs
    from ..judge.judge import Judge
    from ..serving.openrlhf import OpenRLHFConfig

    kw = llm_kwargs(args)
    model = kw.pop("model")
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    judge = Judge.from_pretrained(model, **_kwargs(args, JUDGE_OPTIONS), force=args.force, **kw)
    app = build_app(judge, args.served_model_name or str(model), args.default_max_tokens,
                    OpenRLHFConfig(method=args.rm_method, invalid_reward=args.invalid_reward,
                                   timeout=args.rm_timeout if args.rm_timeout > 0 else None))
    try:
        run_server(app, args.host, args.port, args.log_level)
    finally:
        judge.engine.shutdown()
    return 0
