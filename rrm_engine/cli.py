"""Command line: python -m rrm_engine {judge, rank, eval, demo, train}.

  judge --pairs in.jsonl --out out.jsonl        rows {query, a, b[, label, id]} -> one verdict row each
  rank  --input in.jsonl --out out.jsonl        rows {query, candidates: [...][, id]} -> order + scores
  eval  --pandalm FILE [--limit N]              accuracy vs human labels (ties reported separately)
  eval  --rewardbench FILE [--limit N]          rows {prompt, chosen, rejected, subset}: per-subset + sections
  demo                                          the embedded model: two comparisons and a small ranking
  train ...                                     added by rrm_engine.train.cli when present

Uses only the public API (rrm_engine.LLM via Judge.from_pretrained, the judge layer).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from .judge.judge import Comparison, Judge, Ranking

DEMO_PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin."),
    ("Write a haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide breathes and "
     "turns.", "The sea is big and has water in it."),
]
DEMO_RANK = ("How many legs does a spider have?",
             ["Spiders have eight legs.", "Six.", "A spider has 8 legs, unlike insects, which have 6.",
              "Spiders have no legs."])


def _common(p: argparse.ArgumentParser, max_tokens: int, votes: int) -> None:
    g = p.add_argument_group("judge")
    g.add_argument("--model", default="embedded", help='"embedded", an HF model dir or a .gguf file')
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the engine's choice)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights and KV dtype (default: the engine's choice)")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over this many GPUs (ranks spawned by the engine; default 1)")
    g.add_argument("--votes", type=int, default=votes, help="votes per comparison (majority)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="max generated tokens per vote")
    g.add_argument("--thinking-budget", type=int, default=None,
                   help="force the verdict after this many thinking tokens")
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--swap", choices=("random", "split", "none"), default="random",
                   help="presentation order of the two responses")
    g.add_argument("--strict", action="store_true", help="paper-faithful: invalid votes stay invalid")
    g.add_argument("--adaptive", action="store_true", help="stop voting once the majority is decided")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=32, help="items sent to the engine at once")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rrm_engine", description="Reward Reasoning Model runtime")
    sub = p.add_subparsers(dest="command", required=True)

    j = sub.add_parser("judge", help="judge pairs from a JSONL file")
    j.add_argument("--pairs", required=True, type=Path)
    j.add_argument("--out", required=True, type=Path)
    j.add_argument("--save-text", action="store_true", help="keep each vote's generated text in the output")
    _common(j, 8192, 1)

    r = sub.add_parser("rank", help="rank candidates per query from a JSONL file")
    r.add_argument("--input", required=True, type=Path)
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--method", choices=("knockout", "elo"), default="knockout")
    _common(r, 8192, 1)

    e = sub.add_parser("eval", help="accuracy on PandaLM or RewardBench")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--pandalm", type=Path, help="PandaLM testset-v1 JSON")
    src.add_argument("--rewardbench", type=Path, help="RewardBench JSONL (prompt, chosen, rejected, subset)")
    e.add_argument("--limit", type=int, default=None, help="first N rows only")
    e.add_argument("--out", type=Path, default=None, help="per-row JSONL")
    _common(e, 8192, 1)

    d = sub.add_parser("demo", help="a couple of comparisons and a small ranking on the embedded model")
    _common(d, 32, 1)

    # --- train hook: the training engineer's parser, when the package provides it -----------------
    try:
        from .train.cli import add_parser as add_train_parser
    except ModuleNotFoundError as err:  # only "not there yet" is skipped; a broken module still raises
        if err.name not in ("rrm_engine.train.cli", "rrm_engine.train"):
            raise
    else:
        add_train_parser(sub)
    return p


def _judge(args: argparse.Namespace) -> Judge:
    llm_kwargs: dict[str, Any] = {} if args.device is None else {"device": args.device}
    if args.tensor_parallel_size != 1:
        llm_kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    if args.dtype is not None:
        import torch

        llm_kwargs["dtype"] = getattr(torch, args.dtype)
    judge_kwargs = dict(votes=args.votes, max_tokens=args.max_tokens, thinking_budget=args.thinking_budget,
                        temperature=args.temperature, top_p=args.top_p, swap=args.swap, strict=args.strict,
                        adaptive=args.adaptive, seed=args.seed)
    return Judge.from_pretrained(args.model, **judge_kwargs, **llm_kwargs)


def _chunks(xs: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(xs), max(1, size)):
        yield xs[i:i + size]


def comparison_row(c: Comparison, save_text: bool = False) -> dict:
    votes = []
    for v in c.votes:
        d = {"verdict": v.verdict, "reason": v.reason, "tokens": v.tokens, "p_first": v.p_first,
             "swapped": v.swapped, "forced": v.forced}
        if save_text:
            d["text"] = v.text
        votes.append(d)
    return {"winner": c.winner, "counts": list(c.counts), "p_first": c.p_first, "invalid": c.invalid,
            "invalid_reasons": c.invalid_reasons, "tokens_used": c.tokens_used, "votes_aborted": c.votes_aborted,
            "error": c.error, "votes": votes}


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[f"{x:.3f}" if isinstance(x, float) else str(x) for x in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
        print(f"\n{title}")
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in cells:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        return
    t = Table(title=title)
    for h in header:
        t.add_column(h)
    for r in cells:
        t.add_row(*r)
    Console().print(t)


def _compare_all(judge: Judge, items: list[tuple[str, str, str]], args: argparse.Namespace) -> list[Comparison]:
    from tqdm.auto import tqdm

    out: list[Comparison] = []
    with tqdm(total=len(items), desc="judge", unit="pair", disable=args.quiet) as bar:
        for chunk in _chunks(items, args.batch_size):
            out += judge.compare_batch(list(chunk), errors="return")
            bar.update(len(chunk))
    return out


def cmd_judge(args: argparse.Namespace) -> int:
    from .judge.datasets import read_pairs

    rows = read_pairs(args.pairs)
    judge = _judge(args)
    t0 = time.perf_counter()
    results = _compare_all(judge, [(r.query, r.a, r.b) for r in rows], args)
    with open(args.out, "w", encoding="utf-8") as f:
        for r, c in zip(rows, results):
            f.write(json.dumps({"id": r.id, **comparison_row(c, args.save_text)}, ensure_ascii=False) + "\n")
    _summary("judge", rows, results, time.perf_counter() - t0)
    return 0


def _summary(title: str, rows: Sequence[Any], results: Sequence[Comparison], seconds: float) -> None:
    decided = [c for c in results if c.winner is not None]
    labelled = [(r, c) for r, c in zip(rows, results) if r.label in (1, 2)]
    table = [("items", len(results)), ("decided", len(decided)),
             ("no decision", sum(c.winner is None and c.error is None for c in results)),
             ("errors", sum(c.error is not None for c in results)),
             ("invalid votes", sum(c.invalid for c in results)),
             ("forced votes", sum(v.forced for c in results for v in c.votes)),
             ("tokens (generated + forced)", sum(c.tokens_used for c in results)), ("seconds", round(seconds, 1))]
    if labelled:
        correct = sum(c.winner == r.label - 1 for r, c in labelled)
        table.append(("accuracy (labelled)", correct / len(labelled)))
    print_table(title, ("metric", "value"), table)


def cmd_rank(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .judge.datasets import read_rank_items

    rows = read_rank_items(args.input)
    judge = _judge(args)
    t0 = time.perf_counter()
    results: list[Ranking] = []
    with tqdm(total=len(rows), desc=f"rank ({args.method})", unit="query", disable=args.quiet) as bar:
        for chunk in _chunks(rows, args.batch_size):
            results += judge.rank_batch([(q, c) for _, q, c in chunk], method=args.method, errors="return")
            bar.update(len(chunk))
    with open(args.out, "w", encoding="utf-8") as f:
        for (rid, _, cands), r in zip(rows, results):
            f.write(json.dumps({"id": rid, "order": r.order, "scores": r.scores, "invalid_matches": r.invalid,
                                "matches": [{"i": m.i, "j": m.j, "round": m.round, "winner": m.winner,
                                             "invalid": m.invalid, "counts": list(m.comparison.counts)}
                                            for m in r.matches],
                                "tokens_used": r.tokens_used, "error": r.error}) + "\n")
    print_table(f"rank ({args.method})", ("metric", "value"), [
        ("queries", len(results)), ("errors", sum(r.error is not None for r in results)),
        ("matches", sum(len(r.matches) for r in results)), ("invalid matches", sum(r.invalid for r in results)),
        ("tokens (generated + forced)", sum(r.tokens_used for r in results)),
        ("seconds", round(time.perf_counter() - t0, 1))])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .judge.datasets import read_pandalm, read_rewardbench, section_scores

    rows = read_pandalm(args.pandalm) if args.pandalm else read_rewardbench(args.rewardbench)
    if args.limit is not None:
        rows = rows[: args.limit]
    ties = [r for r in rows if r.label == 0]
    rows = [r for r in rows if r.label in (1, 2)]
    judge = _judge(args)
    t0 = time.perf_counter()
    results = _compare_all(judge, [(r.query, r.a, r.b) for r in rows], args)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for r, c in zip(rows, results):
                f.write(json.dumps({"id": r.id, "label": r.label, "subset": r.subset, **comparison_row(c)}) + "\n")
    correct = [c.winner == r.label - 1 for r, c in zip(rows, results)]
    undecided = sum(c.winner is None for c in results)
    n = max(1, len(rows))
    print_table("eval", ("metric", "value"), [
        ("rows judged (non-tie)", len(rows)), ("tie rows (not judged)", len(ties)),
        ("accuracy", sum(correct) / n), ("accuracy, no decision = 0.5", (sum(correct) + 0.5 * undecided) / n),
        ("no decision", undecided), ("invalid votes", sum(c.invalid for c in results)),
        ("errors", sum(c.error is not None for c in results)),
        ("tokens (generated + forced)", sum(c.tokens_used for c in results)), ("seconds", round(time.perf_counter() - t0, 1))])
    if args.rewardbench:
        right: dict[str, int] = defaultdict(int)
        total: dict[str, int] = defaultdict(int)
        for r, ok in zip(rows, correct):
            total[r.subset or "?"] += 1
            right[r.subset or "?"] += ok
        print_table("per subset", ("subset", "n", "accuracy"),
                    [(s, total[s], right[s] / total[s]) for s in sorted(total)])
        print_table("sections", ("section", "score"), sorted(section_scores(right, total).items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    judge = _judge(args)
    t0 = time.perf_counter()
    comps = judge.compare_batch(DEMO_PAIRS)
    rows = []
    for (q, a, b), c in zip(DEMO_PAIRS, comps):
        who = {0: "A", 1: "B", None: "-"}[c.winner]
        p = "-" if c.p_first is None else f"{c.p_first:.2f}"
        rows.append((q[:40], a[:30], b[:30], who, p, f"{c.counts[0]}-{c.counts[1]}", c.invalid))
    print_table("demo: comparisons", ("query", "A", "B", "winner", "P(A)", "votes A-B", "invalid"), rows)
    q, cands = DEMO_RANK
    r = judge.rank(q, cands, method="knockout")
    print_table(f"demo: knockout ranking of {q!r}", ("place", "candidate", "rounds survived"),
                [(k + 1, cands[i], r.scores[i]) for k, i in enumerate(r.order)])
    print(f"{time.perf_counter() - t0:.1f} s, {sum(c.tokens_used for c in comps) + r.tokens_used} generated tokens")
    return 0


COMMANDS = {"judge": cmd_judge, "rank": cmd_rank, "eval": cmd_eval, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in COMMANDS:
        return COMMANDS[args.command](args)
    handler = getattr(args, "func", None)  # subcommands added by hooks set func (argparse convention)
    if handler is None:
        print(f"no handler for {args.command!r}", file=sys.stderr)
        return 2
    return int(handler(args) or 0)
