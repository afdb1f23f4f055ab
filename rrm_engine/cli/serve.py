"""`python -m rrm_engine serve`: load the model once and serve it over HTTP (see serving/server.py for the routes).
A CLI plugin (rrm_engine/cli/main.py, PLUGINS): the model and judge options are the judging commands' own.

  RRM_API_KEY=... python -m rrm_engine serve --model embedded --host 0.0.0.0 --port 8000 --votes 4

Authentication: with --api-key (or the environment variable RRM_API_KEY, which `ps` does not show)
every route but /health needs `Authorization: Bearer <key>` (OpenAI and vLLM clients send it from
their api_key). A --host other than loopback without a key is refused unless --allow-unauthenticated
says so. The limits (serving/limits.py) have flags of their own names.

Data parallelism: --data-parallel-size N > 1 serves N engine replicas as Ray actors (judge/pool.py:
a local Ray started on demand, or a cluster through --ray-address / $RAY_ADDRESS), each
--tensor-parallel-size M-way tensor parallel, behind this one HTTP front with every route. With
N = 1 (the default) nothing of Ray is imported and the one engine runs in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

API_KEY_ENV = "RRM_API_KEY"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from ..serving.limits import Limits
    from .main import JUDGE_OPTIONS, _add, add_llm_options, positive_float, positive_int

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
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (0.0.0.0: every interface; needs an API key or --allow-unauthenticated)")
    s.add_argument("--port", type=positive_int, default=8000)
    s.add_argument("--served-model-name", default=None, help="the model id in /v1/models (default: --model)")
    s.add_argument("--default-max-tokens", type=positive_int, default=256,
                   help="chat requests that set no max_tokens (default 256, cut to what the context leaves)")
    dp = p.add_argument_group("data parallelism (Ray)")
    dp.add_argument("--data-parallel-size", type=positive_int, default=1,
                    help="engine replicas, each a Ray actor (default 1: one engine in this process, no Ray)")
    dp.add_argument("--ray-address", default=None,
                    help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray started here)")
    dp.add_argument("--replica-cpus", type=positive_float, default=1.0,
                    help="CPUs each replica reserves in Ray (default 1; GPUs: --tensor-parallel-size each)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    a = p.add_argument_group("authentication")
    a.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer <key>' on every route but /health (default: ${API_KEY_ENV}; "
                        "the environment variable keeps the key out of the process list)")
    a.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without an API key (anyone who reaches the port can use it)")
    d = Limits()
    lim = p.add_argument_group("limits (each refusal is a 4xx naming the field; see README 'Running it for a "
                               "training cluster')")
    lim.add_argument("--max-n", type=positive_int, default=d.max_n, help=f"samples per prompt (default {d.max_n})")
    lim.add_argument("--max-votes", type=positive_int, default=d.max_votes,
                     help=f"votes per comparison (default {d.max_votes})")
    lim.add_argument("--max-items", type=positive_int, default=d.max_items,
                     help=f"items of a judge request, queries of a reward request (default {d.max_items})")
    lim.add_argument("--max-candidates", type=positive_int, default=d.max_candidates,
                     help=f"candidates of one rank item (default {d.max_candidates})")
    lim.add_argument("--max-prompts", type=positive_int, default=d.max_prompts,
                     help=f"prompts of one /v1/completions request (default {d.max_prompts})")
    lim.add_argument("--max-stop", type=positive_int, default=d.max_stop,
                     help=f"stop strings, and stop_token_ids, of one request (default {d.max_stop})")
    lim.add_argument("--max-stop-chars", type=positive_int, default=d.max_stop_chars,
                     help=f"characters of one stop string (default {d.max_stop_chars})")
    lim.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes,
                     help=f"request body size; larger gets 413 (default {d.max_body_bytes})")
    lim.add_argument("--max-pending-requests", type=positive_int, default=d.max_pending_requests,
                     help=f"requests admitted and not answered; past it 429 (default {d.max_pending_requests})")
    lim.add_argument("--max-pending-tokens", type=positive_int, default=None,
                     help="work admitted and not done, as samples x max_tokens; past it 429, a single request "
                          "larger than it 413 (default: 16 x the KV pool's tokens)")
    p.set_defaults(func=run)
    return p


def api_key_of(args: argparse.Namespace) -> str | None:
    """The key from --api-key, else $RRM_API_KEY; refuses a non-loopback --host without one unless
    --allow-unauthenticated (checked before the model loads, so the mistake costs nothing)."""
    from ..serving.limits import is_loopback

    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"the API key is empty (--api-key / ${API_KEY_ENV})")
    if key is None and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise ValueError(f"--host {args.host} listens beyond this machine and no API key is set: anyone who "
                         f"reaches the port could use the judge. Set --api-key or ${API_KEY_ENV} (clients send "
                         "'Authorization: Bearer <key>'), or pass --allow-unauthenticated if something in front "
                         "of the server authenticates")
    return key


def run(args: argparse.Namespace) -> int:
    try:
        from ..serving.server import build_app, run_server
    except ImportError as e:
        raise ValueError(f"serve needs the serve extra: pip install 'rrm_engine[serve]' ({e})") from None
    from ..judge.judge import Judge
    from ..serving.limits import Limits
    from ..serving.openrlhf import OpenRLHFConfig
    from .main import JUDGE_OPTIONS, _kwargs, llm_kwargs

    api_key = api_key_of(args)
    limits = Limits(max_n=args.max_n, max_votes=args.max_votes, max_items=args.max_items,
                    max_candidates=args.max_candidates, max_prompts=args.max_prompts, max_stop=args.max_stop,
                    max_stop_chars=args.max_stop_chars, max_body_bytes=args.max_body_bytes,
                    max_pending_requests=args.max_pending_requests, max_pending_tokens=args.max_pending_tokens)
    kw = llm_kwargs(args)
    model = kw.pop("model")
    if args.data_parallel_size > 1:
        from ..judge.pool import JudgePool
        print(f"starting {args.data_parallel_size} replicas of {model} on Ray ...", file=sys.stderr, flush=True)
        try:
            judge = JudgePool(model, num_replicas=args.data_parallel_size, llm_kwargs=kw,
                              judge_kwargs={**_kwargs(args, JUDGE_OPTIONS), "force": args.force},
                              tensor_parallel_size=kw.pop("tensor_parallel_size", 1),
                              ray_address=args.ray_address, num_cpus=args.replica_cpus)
        except (RuntimeError, ImportError) as e:  # a replica that cannot start fails serve with its error
            raise ValueError(str(e)) from e
    else:
        print(f"loading {model} ...", file=sys.stderr, flush=True)
        judge = Judge.from_pretrained(model, **_kwargs(args, JUDGE_OPTIONS), force=args.force, **kw)
    app = build_app(judge, args.served_model_name or str(model), args.default_max_tokens,
                    OpenRLHFConfig(method=args.rm_method, invalid_reward=args.invalid_reward,
                                   timeout=args.rm_timeout if args.rm_timeout > 0 else None),
                    limits=limits, api_key=api_key)
    if api_key is None:
        print("serving without authentication (no --api-key / $RRM_API_KEY)", file=sys.stderr, flush=True)
    try:
        run_server(app, args.host, args.port, args.log_level)
    finally:
        (judge.shutdown if args.data_parallel_size > 1 else judge.engine.shutdown)()
    return 0
