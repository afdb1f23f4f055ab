"""The judging workload of the throughput benchmark: queries, candidates, and the recorded prompts.

Texts come from the PandaLM test set when it is present (--pandalm FILE, else $RRM_PANDALM, else
../shared/data/pandalm_testset_v1.json beside the repository), else from a seeded synthetic
generator; bench.throughput says which, and why, in its [workload] line. Candidates are padded with further real responses and cut
at a token count, so that one comparison prompt (the judge's own RRM prompt: system + query + two
candidates) is close to --prompt-len tokens.

`RecordingLLM` stands between the judge and the LLM's AsyncLLM: it forces every request to the
benchmark's fixed generation length (ignore_eos, max_tokens = gen-len) so every system does the same
work, and records each comparison prompt the judge submitted, its n, and when it was added and
finished. The baselines then replay exactly those prompts.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rrm_engine.core.profiling import phase

PANDALM = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pandalm_testset_v1.json"


def default_pandalm() -> Path:
    env = os.environ.get("RRM_PANDALM")
    return Path(env).expanduser() if env else PANDALM

_WORDS = ("the model answer response query result value system method function data process example "
          "first second because however therefore which would should could between through during "
          "important simple clear step analysis reason evidence detail accurate helpful concise user "
          "question explain describe compare improve write list summary table number code test").split()


@dataclass
class Workload:
    queries: list[str]
    candidates: list[list[str]]  # per query
    source: str  # "pandalm" or "synthetic"
    why: str = ""  # for synthetic text: why the PandaLM file was not used


def _pandalm_rows(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())
    return [r for r in rows if r.get("response1") and r.get("response2")]


def _synthetic_text(rng: random.Random, words: int) -> str:
    sentences, n = [], 0
    while n < words:
        k = rng.randint(6, 16)
        s = " ".join(rng.choice(_WORDS) for _ in range(k))
        sentences.append(s[0].upper() + s[1:] + ".")
        n += k
    return " ".join(sentences)


def _cut(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True) if len(ids) > max_tokens else text


def make_workload(builder: Any, num_queries: int, num_candidates: int, prompt_len: int, seed: int = 0,
                  pandalm: Path | None = None) -> Workload:
    """Q queries with N candidates each; builder is the judge's PromptBuilder (it measures lengths).
    pandalm: the PandaLM test set (default: default_pandalm())."""
    if num_queries < 1 or num_candidates < 2:
        raise ValueError(f"need >= 1 query and >= 2 candidates, got {num_queries} and {num_candidates}")
    rng = random.Random(seed)
    pandalm = Path(pandalm) if pandalm is not None else default_pandalm()
    rows = _pandalm_rows(pandalm)
    tok = builder.tokenizer
    queries, cands = [], []
    for q in range(num_queries):
        if rows:
            row = rows[rng.randrange(len(rows))]
            query = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
            pool = [row["response1"], row["response2"]]
            filler = lambda: rows[rng.randrange(len(rows))][rng.choice(("response1", "response2"))]  # noqa: E731
        else:
            query = _synthetic_text(rng, 20)
            pool = []
            filler = lambda: _synthetic_text(rng, 60)  # noqa: E731
        # what one prompt costs without the candidates; they share the rest equally
        base = len(builder.build(query, "", "").token_ids)
        per_cand = max(1, (prompt_len - base) // 2)
        longs = []
        for c in range(num_candidates):
            text = pool[c] if c < len(pool) else filler()
            while len(tok(text, add_special_tokens=False)["input_ids"]) < per_cand + 16:
                text += "\n\n" + filler()
            longs.append(text)
        # the separators around the candidates cost a few tokens more than `base` saw: correct once
        over = len(builder.build(query, _cut(tok, longs[0], per_cand), _cut(tok, longs[1], per_cand)).token_ids) - prompt_len
        per_cand = max(1, per_cand - over // 2)
        texts = [_cut(tok, t, per_cand) for t in longs]
        queries.append(query)
        cands.append(texts)
    if rows:
        return Workload(queries, cands, "pandalm")
    return Workload(queries, cands, "synthetic", f"the PandaLM test set was not found at {pandalm} (pass --pandalm FILE "
                    "or set RRM_PANDALM; the README's 'Evaluation data' says where to get it)")


@dataclass
class Recorded:
    """One request the judge submitted: a comparison prompt with its votes."""
    prompt_ids: list[int]
    n: int
    t_added: float
    t_done: float | None = None


@dataclass
class RecordingLLM:
    """The engine as the judge sees it (the LLM's shared AsyncLLM: generate / stream / submit / abort),
    with fixed-length generation and a record of every prompt and of each step's time and counters.

    The judge calls this object in place of the AsyncLLM (Judge accepts anything with its interface);
    every request is rewritten to the benchmark's length and recorded, then goes to the real AsyncLLM.
    Steps are timed by wrapping the engine's step() on this engine instance (the AsyncLLM's loop thread
    calls it); `close()` takes the wrapper off again."""
    llm: Any
    gen_len: int
    records: dict[str, Recorded] = field(default_factory=dict)
    step_log: list[tuple[float, dict]] = field(default_factory=list)  # (seconds, metrics delta)
    on_step: Callable[[], None] | None = None  # e.g. the profiler's step marker

    def __post_init__(self) -> None:
        from rrm_engine import AsyncLLM

        self.async_llm = AsyncLLM.of(self.llm)
        self._ids = itertools.count()
        engine = self.llm.engine
        plain_step = type(engine).step.__get__(engine)

        def timed_step() -> list[Any]:
            before = engine.metrics()
            t0 = time.perf_counter()
            with phase("engine.step"):
                outs = plain_step()
            t1 = time.perf_counter()
            after = engine.metrics()
            self.step_log.append((t1 - t0, {k: after[k] - before[k] for k in
                                            ("prefill_tokens_computed", "decode_tokens_computed", "generated_tokens")}))
            for out in outs:
                if out.finished and out.request_id in self.records:
                    self.records[out.request_id].t_done = t1
            if self.on_step is not None:
                self.on_step()
            return outs

        engine.step = timed_step

    def close(self) -> None:
        self.llm.engine.__dict__.pop("step", None)

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    def _record(self, prompt: list[int], params: Any, request_id: str | None) -> tuple[Any, str]:
        if params.max_tokens == 1 and params.logprob_token_ids:
            raise RuntimeError("the judge asked for a forced verdict: the benchmark runs it strict (nothing forced)")
        params = dataclasses.replace(params, ignore_eos=True, max_tokens=self.gen_len)
        rid = request_id if request_id is not None else f"bench-{next(self._ids)}"
        self.records[rid] = Recorded(list(prompt), params.n, time.perf_counter())
        return params, rid

    def submit(self, prompt: list[int], params: Any, *, request_id: str | None = None, timeout: float | None = None):
        params, rid = self._record(prompt, params, request_id)
        return self.async_llm.submit(prompt, params, request_id=rid, timeout=timeout)

    async def generate(self, prompt: list[int], params: Any, *, request_id: str | None = None,
                       timeout: float | None = None) -> Any:
        params, rid = self._record(prompt, params, request_id)
        return await self.async_llm.generate(prompt, params, request_id=rid, timeout=timeout)

    def stream(self, prompt: list[int], params: Any, *, request_id: str | None = None, timeout: float | None = None):
        params, rid = self._record(prompt, params, request_id)
        return self.async_llm.stream(prompt, params, request_id=rid, timeout=timeout)

    def abort(self, request_id: str) -> None:
        self.async_llm.abort(request_id)

    def metrics(self) -> dict:
        return self.llm.metrics()
