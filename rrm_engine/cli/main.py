"""Command line: `rrm-engine` (or `python -m rrm_engine`) {judge, rank, eval, demo, train, serve}.

  judge --pairs in.jsonl --out out.jsonl     rows {query, a, b[, label, id]} -> one verdict row each
  rank  --input in.jsonl --out out.jsonl     rows {query, candidates: [...][, id]} -> order + scores
  eval  --pandalm FILE | --rewardbench FILE  accuracy vs human labels (ties reported separately)
  demo                                       the embedded model: two comparisons and a small ranking
  train ...                                  GRPO (rrm_engine/cli/train.py, a plugin: see PLUGINS)
  serve --port 8000                          HTTP server (rrm_engine/cli/serve.py, a plugin)

What a user can count on:
  * every argument is checked before the model loads: numbers by their argparse type (and
    --kv-cache-tokens against the engine's block size), a .gguf's header and tensor table, the
    input file parsed and checked in full (the first bad row named by file and line; an input with
    nothing to judge is an error), --out created or found writable, an existing --out never
    overwritten without --resume or --overwrite;
  * errors are one line and exit with code 2 (--debug: the traceback instead); Ctrl-C prints one
    line and exits with 130;
  * each finished row is appended to --out at once (results_file.py), so an interrupted run loses
    nothing and `--resume` continues it; a row that failed is printed when it fails, counted in the
    summary, and makes the exit code 1 (--allow-errors: 0);
  * never lost, never mixed: --overwrite writes beside --out (`<out>.partial`) and replaces it only
    when the run completes, so a run that fails (a model that does not load, a crash, a kill)
    leaves the old file as it was; every row records the settings that decide its verdict
    (RUN_SETTINGS: model, weights, votes, max tokens, temperature, seed, swap, method, ...), and
    --resume refuses a file written with other settings, naming the differences;
  * one numbering of the two sides in every judge/eval row: `verdict`, `label` and each vote's
    `verdict` are 1 (response a) / 2 (response b) / null, so `label == verdict` is a correct
    verdict (the Python API's Comparison.winner is the 0-based index, Comparison.verdict the same
    1/2 as the rows); rank rows number candidates by their 0-based position in `candidates`
    (order, each match's i, j and winner);
  * a first run says what it is doing while the model loads (converting a .gguf, building the C++
    CPU ops: a minute or more each, once), a line every few seconds;
  * --max-tokens defaults per model (judge/defaults.py): the RRM paper's 8192 for an RRM checkpoint,
    a small budget for the embedded demo model; the Judge prints which applies.

Extending it (each a small change in one place):
  * an engine option (a keyword of rrm_engine.LLM), e.g. --tensor-parallel-size or --weights:
    one LLMOption in LLM_OPTIONS. Every judging command gets it, parsed and checked by its type
    before the model loads, and passes it to LLM(...) only when given.
  * a subcommand, e.g. `serve`: a module with add_parser(subparsers) -> ArgumentParser that calls
    set_defaults(func=run), listed in PLUGINS (see train/cli.py). It can reuse add_llm_options /
    llm_kwargs and the argument types below; main() gives it --debug, one-line errors and exit codes.

Uses only the public API (rrm_engine.LLM via Judge.from_pretrained, the judge layer).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..model.config import CheckpointError
from ..judge.judge import Comparison, Judge, Ranking
from .results_file import ResultsFile, check_output, partial_path

PROG = "rrm-engine"
EXIT_ROWS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

DEMO_PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin."),
    ("Write a haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide breathes and "
     "turns.", "The sea is big and has water in it."),
]
DEMO_RANK = ("How many legs does a spider have?",
             ["Spiders have eight legs.", "Six.", "A spider has 8 legs, unlike insects, which have 6.",
              "Spiders have no legs."])


# --- argument types: argparse calls them while parsing, before anything is loaded ---------------------
def number_arg(text: str, kind: type, ok: Callable[[Any], bool], need: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return number_arg(text, int, lambda v: v >= 1, "an integer >= 1")


def nonneg_float(text: str) -> float:
    return number_arg(text, float, lambda v: v >= 0 and v != float("inf"), "a number >= 0")


def positive_float(text: str) -> float:
    return number_arg(text, float, lambda v: 0 < v < float("inf"), "a number > 0")


def unit_interval(text: str) -> float:
    return number_arg(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def kv_tokens_arg(text: str) -> int:
    """At least one KV block (LLM refuses fewer, but only after the model has loaded)."""
    import inspect

    from ..llm import LLM
    block = inspect.signature(LLM.__init__).parameters["block_size"].default
    return number_arg(text, int, lambda v: v >= block, f"an integer >= {block} (one KV block)")


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"not a file: {text}")
    return path


def accepted_by(check: Callable[[str], object], text: str) -> str:
    """text, once check(text) has accepted it; check's ValueError becomes argparse's usage error
    (the library's own parser says what is wrong, the CLI does not say it again)."""
    try:
        check(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device_arg(text: str) -> str:
    from ..placement import resolve_device
    return accepted_by(resolve_device, text)


def dtype_arg(text: str) -> str:
    from ..placement import resolve_dtype
    return accepted_by(lambda t: resolve_dtype(t, "cpu"), text)


def model_arg(text: str) -> str:
    """"embedded"/"smollm2-135m", an existing model dir or an existing .gguf file."""
    from ..model.loader import EMBEDDED_NAMES
    if text in EMBEDDED_NAMES:
        return text
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from ..model.gguf_loader import read_gguf
        try:  # the header and tensor table only (memory-mapped): a truncated file is refused now, not after
            read_gguf(path)  # "converting it once" and the start of a load
        except CheckpointError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return str(path)
    if path.is_dir():
        return str(path)
    what = "no such file or directory" if not path.exists() else "not a model dir or a .gguf file"
    raise argparse.ArgumentTypeError(f"{text!r}: {what} (use 'embedded', a Hugging Face model dir or a .gguf file)")


# --- options, as tables: a new one is one entry ------------------------------------------------------
@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    dest: str  # the keyword it becomes (of LLM(...) or Judge(...)); None values are not passed
    kwargs: dict = field(default_factory=dict)  # for add_argument


LLM_OPTIONS: list[Option] = [
    Option(("--model",), "model", dict(default="embedded", type=model_arg,
                                       help='"embedded" (default), a Hugging Face model dir or a .gguf file')),
    Option(("--device",), "device", dict(type=device_arg, help="cpu, cuda, cuda:1 ... (default: cuda if available)")),
    Option(("--dtype",), "dtype", dict(type=dtype_arg, help="float32/fp32, bfloat16/bf16, float16/fp16 "
                                                            "(default: bf16 on cuda, fp32 on cpu)")),
    Option(("--kv-cache-tokens",), "kv_cache_tokens", dict(type=kv_tokens_arg, help="KV cache size in tokens")),
    Option(("--kv-cache-dtype",), "kv_cache_dtype", dict(
        type=dtype_arg, help="KV cache dtype (default: the run dtype); on CPU bfloat16/float16 halve the cache and the "
                             "bytes attention reads, lossy")),
    Option(("--tensor-parallel-size",), "tensor_parallel_size", dict(
        type=positive_int, help="split the model over this many GPUs (ranks spawned by the engine; default 1)")),
    Option(("--weights",), "weights", dict(
        choices=("fp32", "bf16", "q8_0", "q4_1", "auto"),
        help="CPU format of the linear weights: fp32 (the exact reference), bf16, q8_0 / q4_1 (GGUF blocks, int8 "
             "matmuls), auto (fastest without loss for the checkpoint: q4_1 for the embedded model); default: "
             "auto for a Q8_0/Q4_1 .gguf (the embedded model included), else the run dtype")),
]

JUDGE_OPTIONS: list[Option] = [
    Option(("--votes",), "votes", dict(type=positive_int, default=1,
                                       help="votes per comparison (majority; default 1)")),
    Option(("--max-tokens",), "max_tokens", dict(
        type=positive_int, help="max generated tokens per vote (default per model: 8192, the RRM paper's, for an "
                                "RRM checkpoint; 64 for the embedded demo model)")),
    Option(("--thinking-budget",), "thinking_budget", dict(
        type=positive_int, help="force the verdict after this many thinking tokens (default: none)")),
    Option(("--temperature",), "temperature", dict(type=nonneg_float, default=0.6, help="default 0.6 (0: greedy)")),
    Option(("--top-p",), "top_p", dict(type=unit_interval, default=1.0, help="default 1.0")),
    Option(("--swap",), "swap", dict(choices=("random", "split", "none"), default="random",
                                     help="presentation order: random (a coin per vote, default), split (half "
                                          "each way), none")),
    Option(("--strict",), "strict", dict(action="store_true", help="paper-faithful: invalid votes stay invalid")),
    Option(("--reading",), "reading", dict(
        choices=("exact", "tolerant"), help="how a box is read: exact (the reference parser: \\boxed{Assistant 1} "
                                            "or 2 only; default for eval and --strict) or tolerant (wrappers, case, "
                                            "NFKC; default for judge and rank)")),
    Option(("--adaptive",), "adaptive", dict(action="store_true", help="stop voting once the majority is decided")),
    Option(("--seed",), "seed", dict(type=int, default=0, help="default 0")),
]


def _add(group: Any, options: Sequence[Option]) -> None:
    for o in options:
        group.add_argument(*o.flags, dest=o.dest, **o.kwargs)


def add_llm_options(p: argparse.ArgumentParser) -> None:
    _add(p.add_argument_group("model"), LLM_OPTIONS)


def _kwargs(args: argparse.Namespace, options: Sequence[Option]) -> dict[str, Any]:
    return {o.dest: getattr(args, o.dest) for o in options if getattr(args, o.dest, None) is not None}


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keywords for rrm_engine.LLM from the parsed LLM_OPTIONS (model included)."""
    return _kwargs(args, LLM_OPTIONS)


def add_debug_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _add_judge_command_options(p: argparse.ArgumentParser, out_required: bool) -> None:
    add_llm_options(p)
    _add(p.add_argument_group("judge"), JUDGE_OPTIONS)
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, required=out_required, default=None,
                   help="results JSONL: one row per item, appended as each finishes")
    g.add_argument("--resume", action="store_true", help="continue --out: keep its finished rows, run the rest "
                   "(refused when they were judged with other settings)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out once this run completes "
                   "(rows go to OUT.partial until then; with --resume: continue that partial run)")
    g.add_argument("--allow-errors", action="store_true", help="exit 0 even when some rows failed")
    g.add_argument("--batch-size", type=positive_int, default=32, help="items given to the engine at once")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_option(p)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is one --help away), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Reward Reasoning Model runtime: judge, rank, evaluate and train RRMs")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(c.name for c in COMMANDS) + ",...}")
    for c in COMMANDS:
        sp = sub.add_parser(c.name, help=c.help, description=c.help)
        c.arguments(sp)
        sp.set_defaults(func=c.run)
    for module in PLUGINS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:  # only "not there" is skipped; a broken module still raises
            if err.name is None or not module.startswith(err.name):
                raise
            continue
        sp = mod.add_parser(sub)
        if "--debug" not in sp._option_string_actions:
            add_debug_option(sp)
    return p


# --- loading the judge --------------------------------------------------------------------------------
def make_judge(args: argparse.Namespace) -> Judge:
    kw = llm_kwargs(args)
    model = kw.pop("model")
    if args.quiet:
        return Judge.from_pretrained(model, **_kwargs(args, JUDGE_OPTIONS), **kw)
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with loading_progress():
        judge = Judge.from_pretrained(model, **_kwargs(args, JUDGE_OPTIONS), **kw)
    print(f"loaded in {time.perf_counter() - t0:.1f} s (weights: {getattr(judge.llm, 'weights', None) or 'as loaded'})",
          file=sys.stderr, flush=True)
    return judge


# what a slow load is doing, by the code on the loading thread's stack (innermost frame first; the
# first entry that matches a frame names the step)
LOADING_STEPS: tuple[tuple[str, str, str], ...] = (
    # (part of the file's path, function name or "" for any, what to print)
    ("/cpp_extension.py", "", "building the C++ CPU ops (first use on this machine; cached afterwards)"),
    ("/gguf_loader.py", "_content_hash", "hashing the .gguf (to find its converted copy)"),
    ("/gguf_loader.py", "", "converting the .gguf into fp32 safetensors (first load only; cached afterwards)"),
    ("/weight_formats.py", "", "packing the weights into GGUF blocks"),
    ("/tokenization_", "", "loading the tokenizer"),
    ("/safetensors/", "", "reading the weights"),
    ("/hf_loader.py", "", "reading the weights"),
    ("/memory_profile.py", "", "planning memory"),
)


def loading_step(thread_id: int) -> str:
    """The step the thread is in, named by LOADING_STEPS (else "loading")."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:  # innermost first: a build inside a load is the build
        filename = frame.f_code.co_filename.replace("\\", "/")
        for part, func, what in LOADING_STEPS:
            if part in filename and (not func or func == frame.f_code.co_name):
                return what
        frame = frame.f_back
    return "loading"


@contextlib.contextmanager
def loading_progress(every: float = 10.0):
    """While the body runs: a line on stderr every `every` seconds with the time so far and the step
    in progress. A first run converts a .gguf and builds the C++ ops, over a minute in all, that would
    otherwise pass in silence; a cached load ends before the first line."""
    caller, stop, t0 = threading.get_ident(), threading.Event(), time.perf_counter()

    def beat() -> None:
        while not stop.wait(every):
            print(f"{PROG}: still loading ({time.perf_counter() - t0:.0f} s): {loading_step(caller)}",
                  file=sys.stderr, flush=True)

    t = threading.Thread(target=beat, name="rrm-cli-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


# --- items, streamed results, summaries -------------------------------------------------------------
@dataclass
class Item:
    index: int  # position in the input: the key --resume uses
    id: Any
    where: str  # "FILE line N", for messages
    work: tuple  # (query, a, b) or (query, candidates)
    fields: dict = field(default_factory=dict)  # copied into the output row (label, subset, ...)


def check_items(items: Sequence[Item], check: Callable[[tuple], Any]) -> None:
    """Every item checked by the judge's own rule before the model loads; the first bad one named."""
    bad = []
    for it in items:
        try:
            check(it.work)
        except ValueError as e:
            bad.append(f"{it.where}: {e}")
    if bad:
        more = f" ({len(bad)} bad rows in all; the first is shown)" if len(bad) > 1 else ""
        raise ValueError(bad[0] + more)


def comparison_row(c: Comparison, save_text: bool = False) -> dict:
    """One judge/eval row. Sides are 1 (response a) and 2 (response b) everywhere in it: `verdict`
    (the majority's; null: no decision), `label` (from the input) and each vote's `verdict`;
    `counts` and `p_first` are [a, b] and P(a better)."""
    votes = []
    for v in c.votes:
        d = {"verdict": v.verdict, "reason": v.reason, "tokens": v.tokens, "p_first": v.p_first,
             "swapped": v.swapped, "forced": v.forced}
        if save_text:
            d["text"] = v.text
        votes.append(d)
    return {"verdict": c.verdict, "counts": list(c.counts), "p_first": c.p_first, "invalid": c.invalid,
            "invalid_reasons": c.invalid_reasons, "tokens_used": c.tokens_used, "votes_aborted": c.votes_aborted,
            "error": c.error, "votes": votes}


def ranking_row(r: Ranking) -> dict:
    """One rank row: candidates by their 0-based position in the input's `candidates` (order, i, j,
    winner); each match's counts are [votes for i, votes for j]."""
    return {"order": r.order, "scores": r.scores, "invalid_matches": r.invalid,
            "matches": [{"i": m.i, "j": m.j, "round": m.round, "winner": m.winner, "invalid": m.invalid,
                         "counts": list(m.comparison.counts)} for m in r.matches],
            "tokens_used": r.tokens_used, "error": r.error}


# what decides a row's verdict, recorded in every row (`settings`) and compared by --resume. The
# judge options are as given (each has a default or is None); "model" is normalised; "max_tokens"
# (None: the model's default) and "weights" (None: the format the model chooses) are recorded as
# the loaded judge resolved them, and compared once it has loaded, before anything runs.
RUN_SETTINGS = ("model", "weights", "votes", "max_tokens", "thinking_budget", "temperature", "top_p", "swap",
                "strict", "adaptive", "seed", "method")


def run_settings(args: argparse.Namespace, judge: Judge | None = None) -> dict[str, Any]:
    """The RUN_SETTINGS known now: before the load (judge None) the ones the arguments fix, after it all."""
    from ..model.loader import EMBEDDED_NAMES
    model = args.model if args.model in EMBEDDED_NAMES else str(Path(args.model).resolve())
    known = {"model": "embedded" if model in EMBEDDED_NAMES else model, "method": getattr(args, "method", None),
             **{o.dest: getattr(args, o.dest) for o in JUDGE_OPTIONS}}
    if judge is not None:
        known.update(max_tokens=judge.max_tokens, weights=getattr(judge.llm, "weights", None))
    else:
        if known["max_tokens"] is None:
            del known["max_tokens"]
        known.pop("weights", None)
    return {k: known[k] for k in RUN_SETTINGS if k in known}


def _chunks(xs: Sequence[Any], size: int):
    for i in range(0, len(xs), size):
        yield xs[i:i + size]


@dataclass
class RunOutcome:
    rows: list[dict]  # every row of the run, earlier (resumed) ones included, in input order
    seconds: float
    interrupted: bool = False


def run_items(args: argparse.Namespace, items: list[Item], kind: str,
              to_row: Callable[[Any], dict]) -> RunOutcome:
    """Judge the items not yet in --out, appending each row as it finishes. kind: "compare" | "rank"."""
    results = None
    if args.out is not None:
        check_output(args.out, args.resume, args.overwrite)
        results = ResultsFile(args.out, resume=args.resume, replace=args.overwrite)
        partial = partial_path(args.out)
        if args.resume and not args.overwrite and partial.exists():
            print(f"{PROG}: note: {partial} holds the rows of an interrupted --overwrite run; this --resume continues "
                  f"{args.out} (add --overwrite to continue that run instead)", file=sys.stderr)
    done = results.done if results is not None else {}
    by_index = {it.index: it for it in items}
    for index, row in done.items():
        it = by_index.get(index)
        if it is None or row.get("id") != it.id:
            raise ValueError(f"cannot resume {args.out}: its row for input index {index} has id {row.get('id')!r}, "
                             f"the input has {None if it is None else it.id!r} there (was the input changed?)")
    if results is not None:
        results.check_settings(run_settings(args))  # before the load: what the arguments fix
    todo = [it for it in items if it.index not in done]
    new_rows: list[dict] = []
    t0 = time.perf_counter()
    if done:
        print(f"resuming {results.work}: {len(done)} of {len(items)} rows already there, {len(todo)} to run",
              file=sys.stderr)
    if not todo:
        return _outcome(results, new_rows, t0)

    judge = make_judge(args)
    settings = run_settings(args, judge)
    if results is not None:
        results.check_settings(settings)  # the model's defaults, now that it has loaded; nothing has run yet
    from tqdm.auto import tqdm
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=kind, unit="item", disable=args.quiet,
               file=sys.stderr, dynamic_ncols=True)

    def on_result(chunk: Sequence[Item], k: int, result: Any) -> None:
        it = chunk[k]
        row = {"index": it.index, "id": it.id, **it.fields, **to_row(result), "settings": settings}
        if results is not None:
            results.write(row)
        new_rows.append(row)
        if row.get("error"):
            bar.write(f"{PROG}: {it.where} (id {it.id!r}) failed: {row['error']}", file=sys.stderr)
        bar.update(1)

    try:
        for chunk in _chunks(todo, args.batch_size):
            cb = lambda k, r, chunk=chunk: on_result(chunk, k, r)  # noqa: E731
            if kind == "compare":
                judge.compare_batch([it.work for it in chunk], errors="return", on_result=cb)
            else:
                judge.rank_batch([it.work for it in chunk], method=args.method, errors="return", on_result=cb)
    except KeyboardInterrupt:
        bar.close()
        outcome = _outcome(results, new_rows, t0, complete=False)
        if results is None:
            where = "nothing was saved (no --out)"
        elif results.work != results.path:
            where = (f"{len(outcome.rows)} of {len(items)} rows are in {results.work} and {args.out} is as it was; run "
                     "the same command with --resume to finish (it replaces the file when the run completes)")
        else:
            where = f"{len(outcome.rows)} of {len(items)} rows are in {args.out}; run the same command with --resume " \
                    "to finish"
        print(f"{PROG}: interrupted: {where}", file=sys.stderr)
        outcome.interrupted = True
        return outcome
    bar.close()
    return _outcome(results, new_rows, t0)


def _outcome(results: ResultsFile | None, new_rows: list[dict], t0: float, complete: bool = True) -> RunOutcome:
    if results is None:
        return RunOutcome(sorted(new_rows, key=lambda r: r["index"]), time.perf_counter() - t0)
    results.close(complete)
    return RunOutcome(results.rows(), time.perf_counter() - t0)


def exit_code(args: argparse.Namespace, outcome: RunOutcome) -> int:
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    failed = [r for r in outcome.rows if r.get("error")]
    if not failed:
        return 0
    where = f" (each row's error is in {args.out})" if args.out else ""
    print(f"{PROG}: {len(failed)} of {len(outcome.rows)} rows failed{where}; first: index {failed[0]['index']}: "
          f"{failed[0]['error']}", file=sys.stderr)
    return 0 if args.allow_errors else EXIT_ROWS_FAILED


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


def _comparison_summary(rows: Sequence[dict], seconds: float) -> list[tuple[str, Any]]:
    return [("items", len(rows)), ("decided", sum(r["verdict"] is not None for r in rows)),
            ("no decision", sum(r["verdict"] is None and not r["error"] for r in rows)),
            ("errors", sum(bool(r["error"]) for r in rows)),
            ("invalid votes", sum(r["invalid"] for r in rows)),
            ("forced votes", sum(v["forced"] for r in rows for v in r["votes"])),
            ("tokens (generated + forced)", sum(r["tokens_used"] for r in rows)),
            ("seconds (this run)", round(seconds, 1))]


# --- commands -------------------------------------------------------------------------------------
def _judge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, type=existing_file, help="JSONL rows {query, a, b[, label, id]}")
    p.add_argument("--save-text", action="store_true", help="keep each vote's generated text in the output")
    _add_judge_command_options(p, out_required=True)


def run_judge(args: argparse.Namespace) -> int:
    from ..judge.datasets import read_pairs

    rows = read_pairs(args.pairs)
    if not rows:
        raise ValueError(f"{args.pairs} has no rows: nothing to judge")
    items = [Item(n, r.id, r.where, (r.query, r.a, r.b), {"label": r.label if r.label in (1, 2) else None})
             for n, r in enumerate(rows)]
    check_items(items, Judge.validate_pair)
    outcome = run_items(args, items, "compare", lambda c: comparison_row(c, args.save_text))
    table = _comparison_summary(outcome.rows, outcome.seconds)
    labelled = [r for r in outcome.rows if r["label"] in (1, 2)]
    if labelled:
        table.append(("accuracy (labelled)", sum(r["verdict"] == r["label"] for r in labelled) / len(labelled)))
    print_table("judge", ("metric", "value"), table)
    return exit_code(args, outcome)


def _rank_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, type=existing_file, help="JSONL rows {query, candidates: [...][, id]}")
    p.add_argument("--method", choices=("knockout", "elo"), default="knockout")
    _add_judge_command_options(p, out_required=True)


def run_rank(args: argparse.Namespace) -> int:
    from ..judge.datasets import read_rank_rows

    items = [Item(n, r.id, r.where, (r.query, r.candidates)) for n, r in enumerate(read_rank_rows(args.input))]
    if not items:
        raise ValueError(f"{args.input} has no rows: nothing to rank")
    check_items(items, Judge.validate_rank)
    outcome = run_items(args, items, "rank", ranking_row)
    rows = outcome.rows
    print_table(f"rank ({args.method})", ("metric", "value"), [
        ("queries", len(rows)), ("errors", sum(bool(r["error"]) for r in rows)),
        ("matches", sum(len(r["matches"]) for r in rows)), ("invalid matches", sum(r["invalid_matches"] for r in rows)),
        ("tokens (generated + forced)", sum(r["tokens_used"] for r in rows)),
        ("seconds (this run)", round(outcome.seconds, 1))])
    return exit_code(args, outcome)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pandalm", type=existing_file, help="PandaLM testset-v1 JSON (see README: evaluation data)")
    src.add_argument("--rewardbench", type=existing_file, help="RewardBench JSONL (prompt, chosen, rejected, subset)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N rows only")
    _add_judge_command_options(p, out_required=False)
    p.set_defaults(reading="exact")  # accuracy as the RRM release's reference parser scores it


def run_eval(args: argparse.Namespace) -> int:
    from ..judge.datasets import read_pandalm, read_rewardbench, section_scores

    data = read_pandalm(args.pandalm) if args.pandalm else read_rewardbench(args.rewardbench)
    if args.limit is not None:
        data = data[: args.limit]
    ties = sum(r.label == 0 for r in data)
    items = [Item(n, r.id, r.where, (r.query, r.a, r.b), {"label": r.label, "subset": r.subset})
             for n, r in enumerate(data) if r.label in (1, 2)]
    if not items:
        source = args.pandalm or args.rewardbench
        raise ValueError(f"{source} has no rows to judge" if not data else
                         f"{source}: all {len(data)} rows read are ties (label 0), which are not judged: nothing to do")
    check_items(items, Judge.validate_pair)
    outcome = run_items(args, items, "compare", comparison_row)
    rows = outcome.rows
    correct = [r["verdict"] == r["label"] for r in rows]
    undecided = sum(r["verdict"] is None for r in rows)
    n = max(1, len(rows))
    print_table("eval", ("metric", "value"), [
        ("rows judged (non-tie)", len(rows)), ("tie rows (not judged)", ties),
        ("accuracy", sum(correct) / n), ("accuracy, no decision = 0.5", (sum(correct) + 0.5 * undecided) / n),
        *[x for x in _comparison_summary(rows, outcome.seconds) if x[0] not in ("items", "decided")]])
    if args.rewardbench:
        right: dict[str, int] = defaultdict(int)
        total: dict[str, int] = defaultdict(int)
        for r, ok in zip(rows, correct):
            total[r["subset"] or "?"] += 1
            right[r["subset"] or "?"] += ok
        print_table("per subset", ("subset", "n", "accuracy"),
                    [(s, total[s], right[s] / total[s]) for s in sorted(total)])
        print_table("sections", ("section", "score"), sorted(section_scores(right, total).items()))
    return exit_code(args, outcome)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    add_llm_options(p)
    _add(p.add_argument_group("judge"), JUDGE_OPTIONS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_option(p)


def run_demo(args: argparse.Namespace) -> int:
    judge = make_judge(args)
    t0 = time.perf_counter()
    print(f"demo: {len(DEMO_PAIRS)} comparisons, {judge.votes} vote(s) each, up to {judge.max_tokens} tokens per vote",
          file=sys.stderr)
    comps = judge.compare_batch(DEMO_PAIRS, progress=not args.quiet)
    rows = []
    for (q, a, b), c in zip(DEMO_PAIRS, comps):
        who = {0: "A", 1: "B", None: "-"}[c.winner]
        p = "-" if c.p_first is None else f"{c.p_first:.2f}"
        rows.append((q[:40], a[:30], b[:30], who, p, f"{c.counts[0]}-{c.counts[1]}", c.invalid))
    print_table("demo: comparisons", ("query", "A", "B", "winner", "P(A)", "votes A-B", "invalid"), rows)
    q, cands = DEMO_RANK
    print(f"demo: knockout ranking of {len(cands)} candidates ({len(cands) - 1} matches)", file=sys.stderr)
    (r,) = judge.rank_batch([(q, cands)], method="knockout", progress=not args.quiet)
    if r.error:
        raise RuntimeError(r.error)
    print_table(f"demo: knockout ranking of {q!r}", ("place", "candidate", "rounds survived"),
                [(k + 1, cands[i], r.scores[i]) for k, i in enumerate(r.order)])
    print(f"{time.perf_counter() - t0:.1f} s, {sum(c.tokens_used for c in comps) + r.tokens_used} generated tokens")
    return 0


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("judge", "judge pairs from a JSONL file", _judge_arguments, run_judge),
    Command("rank", "rank candidates per query from a JSONL file", _rank_arguments, run_rank),
    Command("eval", "accuracy on PandaLM or RewardBench", _eval_arguments, run_eval),
    Command("demo", "two comparisons and a small ranking on the embedded model", _demo_arguments, run_demo),
]
# modules with add_parser(subparsers) -> ArgumentParser (setting func=); skipped when not installed
PLUGINS: tuple[str, ...] = ("rrm_engine.cli.train", "rrm_engine.cli.serve")

# errors that are the user's to fix: one line, exit code 2
USER_ERRORS = (ValueError, CheckpointError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, USER_ERRORS):
            print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{PROG} {args.command}: {type(e).__name__}: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1


def console_main() -> None:
    """The `rrm-engine` console script."""
    raise SystemExit(main())
