"""A step that raises changes nothing later requests can see (engine.py, "Failed steps").

Faults are injected into a real engine on a tiny random Qwen2 at each point of a step: inside the
scheduler (a block allocation, a radix-tree insert), before the copy-on-write copies, in the
middle of the decoder (a forward hook on layer 1, after layer 0 wrote its KV), in sampling, in
the fork, in the append. Each time: exactly the requests of the failing step fail, with the error;
every other request gives the tokens a clean engine gives; the same prompts submitted afterwards
(they match whatever the prefix cache holds) give a clean engine's greedy tokens; engine.check()
holds after every step and the pool ends holding only the tree's blocks.
"""
from __future__ import annotations

import random

import pytest

import rrm_engine.core.engine as engine_mod
from rrm_engine import LLM, SamplingParams
from rrm_engine.core.engine import StepError
from fault_injection import Chaos, Fault, InjectedFault
from tiny_engine_model import rand_ids, small_model

BS = 4


@pytest.fixture(scope="module")
def model():
    return small_model()


def make_llm(model, max_num_batched_tokens: int = 32) -> LLM:
    # small pages and a small token budget: chunked prefills, shared partial blocks, forks
    return LLM(model, kv_cache_tokens=96 * BS, block_size=BS, max_num_batched_tokens=max_num_batched_tokens,
               max_num_seqs=6)


def layer1(model):
    return model.model.model.layers[1]


def workload() -> list[tuple[list[int], SamplingParams]]:
    """Prompts that share a 10-token prefix (2 full blocks + a partial one) and others that do
    not; n=3 requests fork (their partial last block is copied on the first write)."""
    rng = random.Random(7)
    prefix = rand_ids(rng, 10)
    work = []
    for i in range(8):
        prompt = prefix + rand_ids(rng, rng.randrange(1, 10)) if i % 2 == 0 else rand_ids(rng, rng.randrange(5, 22))
        params = SamplingParams(n=3 if i % 3 == 0 else 1, temperature=0.0 if i % 4 < 2 else 0.8, seed=i,
                                max_tokens=6 + i % 4, ignore_eos=True)
        work.append((prompt, params))
    return work


def tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def logprobs(out) -> list[float]:
    return [c.cumulative_logprob for c in out.outputs]


def same(outs, refs) -> bool:
    """Same tokens, and the same log-probs: garbage KV can leave a tiny model's greedy tokens
    unchanged while it moves their log-probs by ~0.5."""
    return (len(outs) == len(refs) and all(tokens(o) == tokens(r) for o, r in zip(outs, refs))
            and all(logprobs(o) == pytest.approx(logprobs(r), abs=1e-3) for o, r in zip(outs, refs)))


LATER = SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def clean(model):
    """What a clean engine gives: the workload, then the same prompts again (greedy, n=2)."""
    work = workload()
    llm = make_llm(model)
    first = llm.generate([p for p, _ in work], [sp for _, sp in work])
    later = make_llm(model).generate([p for p, _ in work], LATER)
    return first, later


def inject(point: str, llm: LLM, model, monkeypatch) -> Fault:
    eng = llm.engine
    if point == "schedule: block allocation":
        f = Fault(eng, eng.pool.allocate, at=7)
        monkeypatch.setattr(eng.pool, "allocate", f)
    elif point == "schedule: tree insert":
        f = Fault(eng, eng.tree.insert_full, at=4)
        monkeypatch.setattr(eng.tree, "insert_full", f)
    elif point == "before copy-on-write copies":
        f = Fault(eng, eng.runner.copy_blocks, at=1, when=lambda copies: bool(copies))
        monkeypatch.setattr(eng.runner, "copy_blocks", f)
    elif point.startswith("mid-forward"):
        at = int(point.split("call ")[1].rstrip(")"))
        f = Fault(eng, None, at=at)
        handle = layer1(model).register_forward_hook(f.hook)
        monkeypatch.setattr(f, "remove", handle.remove, raising=False)
    elif point == "sampling":
        f = Fault(eng, engine_mod.sample, at=3)
        monkeypatch.setattr(engine_mod, "sample", f)
    elif point == "fork":
        f = Fault(eng, eng._fork, at=2)
        monkeypatch.setattr(eng, "_fork", f)
    elif point == "append":
        f = Fault(eng, eng._append, at=9)
        monkeypatch.setattr(eng, "_append", f)
    else:
        raise AssertionError(point)
    return f


POINTS = ["schedule: block allocation", "schedule: tree insert", "before copy-on-write copies",
          "mid-forward (layer 1, call 1)", "mid-forward (layer 1, call 3)", "sampling", "fork", "append"]


def only_tree_holds_blocks(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.has_unfinished()
    assert all(c in (0, 1) for c in eng.pool.ref_counts), "a finished request still holds blocks"
    llm.invalidate_prefix_cache()
    assert eng.pool.num_free == eng.pool.num_blocks
    eng.check()


@pytest.mark.parametrize("point", POINTS)
def test_failed_step_changes_nothing_later_requests_see(model, clean, point, monkeypatch):
    ref_first, ref_later = clean
    work = workload()
    llm = make_llm(model)
    fault = inject(point, llm, model, monkeypatch)
    try:
        ids = [llm.add_request(p, sp) for p, sp in work]
        done, errors = {}, []
        while llm.has_unfinished():
            try:
                done.update({o.request_id: o for o in llm.step() if o.finished})
            except StepError as e:
                errors.append(e)
                for o in e.outputs:
                    assert o.finished and o.error == f"InjectedFault: {e.error}"
                    assert "error" in [c.finish_reason for c in o.outputs]
            llm.engine.check()
    finally:
        if hasattr(fault, "remove"):
            fault.remove()
    assert fault.fired and len(errors) == 1, "the fault must fire exactly once"
    failed = set(errors[0].request_ids)
    assert isinstance(errors[0].__cause__, InjectedFault)
    # only the requests of the failing step fail, and they do not also finish normally
    assert failed == fault.touched and failed and len(failed) < len(ids)
    assert not failed & done.keys() and len(done) + len(failed) == len(ids)
    for rid, ref in zip(ids, ref_first):
        if rid not in failed:
            assert same([done[rid]], [ref]), f"{rid} differs from a clean engine after a fault at {point}"
    m = llm.metrics()
    assert m["failed_steps"] == 1 and m["failed_requests"] == len(failed)
    # later requests reuse whatever the cache kept: they must still see only computed KV
    later = llm.generate([p for p, _ in work], LATER)
    assert same(later, ref_later)
    assert sum(o.num_cached_tokens for o in later) > 0  # the cache did serve them
    only_tree_holds_blocks(llm)


def test_check_catches_blocks_marked_computed_that_were_never_computed(model):
    """The old failure mode, replayed without the rollback: a decoder fault leaves the step's
    tree nodes in flight; the caller aborts its requests; the next step marks those nodes
    computed though nothing ever wrote their KV. check() must refuse both states."""
    llm = make_llm(model)
    eng = llm.engine
    work = workload()
    ids = [llm.add_request(p, sp) for p, sp in work[:2]]
    fault = Fault(eng, None, at=1)
    handle = layer1(model).register_forward_hook(fault.hook)
    try:
        with pytest.raises(InjectedFault):
            eng._step()  # the step without its rollback: what the engine used to do
    finally:
        handle.remove()
    with pytest.raises(AssertionError, match="during a step"):
        eng.check()
    eng._running_step = eng.scheduler.current = None
    for rid in ids:
        eng.abort(rid)
    with pytest.raises(AssertionError, match="in flight"):
        eng.check()
    llm.add_request(rand_ids(random.Random(99), 5), SamplingParams(max_tokens=1))
    eng._step()  # marks the leftover nodes computed
    with pytest.raises(AssertionError, match="committed KV"):
        eng.check()


def test_check_catches_a_copy_on_write_that_was_never_applied(model):
    llm = make_llm(model)
    eng = llm.engine
    prompt = rand_ids(random.Random(5), 10)  # 2 full blocks + 2 tokens
    llm.add_request(prompt, SamplingParams(n=3, temperature=0.0, max_tokens=4, ignore_eos=True))
    eng.step()  # prefill + fork: the siblings share the partial last block
    fault = Fault(eng, eng.runner.copy_blocks, at=1, when=lambda copies: bool(copies))
    eng.runner.copy_blocks = fault
    with pytest.raises(InjectedFault):
        eng._step()
    eng._running_step = eng.scheduler.current = None
    with pytest.raises(AssertionError, match="committed KV"):
        eng.check()


def test_failed_copy_on_write_leaves_no_uncopied_block_in_the_cache(model):
    """The forked votes' first decode copies their shared partial block; the copies fail. A later
    request with the same prompt must not match the never-copied blocks (the rollback drops the
    failed samples without keeping their tails in the tree)."""
    prompt = rand_ids(random.Random(5), 10)  # 2 full blocks + 2 tokens
    later = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ref = make_llm(model).generate([prompt + [7]], later)
    llm = make_llm(model)
    eng = llm.engine
    llm.add_request(prompt, SamplingParams(n=3, temperature=0.0, max_tokens=4, ignore_eos=True))
    eng.step()  # prefill + fork: the siblings share the partial last block
    eng.runner.copy_blocks = Fault(eng, eng.runner.copy_blocks, at=1, when=lambda copies: bool(copies))
    with pytest.raises(StepError):
        eng.step()
    eng.check()
    assert same(llm.generate([prompt + [7]], later), ref)
    only_tree_holds_blocks(llm)


def test_generate_never_leaves_its_requests_behind(model, clean):
    ref_first, _ = clean
    work = workload()
    prompts, params = [p for p, _ in work], [sp for _, sp in work]
    llm = make_llm(model)
    layer = layer1(model)
    for exc, expect in ((InjectedFault, StepError), (KeyboardInterrupt, KeyboardInterrupt)):
        fault = Fault(llm.engine, None, at=3, exc=exc)
        handle = layer.register_forward_hook(fault.hook)
        try:
            with pytest.raises(expect):
                llm.generate(prompts, params)
        finally:
            handle.remove()
        assert fault.fired
        assert not llm.has_unfinished() and not llm.engine.scheduler.has_work()
        llm.engine.check()
        # the next call runs only its own requests and gives a clean engine's tokens
        assert same(llm.generate(prompts, params), ref_first)
    only_tree_holds_blocks(llm)


def test_caller_driven_requests_outside_a_failed_generate_go_on(model, clean):
    """generate() raises only when the failed step held one of its own requests; a caller-driven
    request failed by a step inside generate() comes back (with .error) from the next step()."""
    ref_first, _ = clean
    work = workload()
    llm = make_llm(model, max_num_batched_tokens=len(work[0][0]))  # the first step holds `mine` alone
    mine = llm.add_request(*work[0])
    fault = Fault(llm.engine, None, at=1)
    handle = layer1(model).register_forward_hook(fault.hook)
    try:
        outs = llm.generate([p for p, _ in work[1:]], [sp for _, sp in work[1:]])
    finally:
        handle.remove()
    # the first step held only the caller-driven request (it was queued first)
    assert fault.touched == {mine}
    assert same(outs, ref_first[1:])
    [failed] = llm.step()
    assert failed.request_id == mine and failed.finished and failed.error.startswith("InjectedFault")
    assert not llm.has_unfinished()
    llm.engine.check()


def test_random_faults_under_a_random_workload_never_leak_or_corrupt(model):
    """Hundreds of requests (shared prefixes, forks, aborts, a pool small enough to evict and
    preempt) while faults fire at random points of random steps: check() holds after every step,
    every request ends exactly once, and every output is the clean engine's (failed and aborted
    samples: a prefix of it)."""
    rng = random.Random(21)
    heads = [rand_ids(rng, rng.randrange(3, 14)) for _ in range(5)]
    specs = []
    for i in range(30):
        prompt = rng.choice(heads) + rand_ids(rng, rng.randrange(1, 12))
        specs.append((prompt, SamplingParams(n=rng.choice([1, 2, 3]), temperature=rng.choice([0.0, 0.9]),
                                             top_k=rng.choice([0, 16]), seed=300 + i,
                                             max_tokens=rng.randrange(1, 10), ignore_eos=True)))
    ref_llm = make_llm(model)
    ref = [tokens(ref_llm.generate([p], sp)[0]) for p, sp in specs]
    llm = LLM(model, kv_cache_tokens=24 * BS, block_size=BS, max_num_batched_tokens=48, max_num_seqs=12)
    eng = llm.engine
    # points reached once per step fire more often than those reached per sequence or per layer
    per_step = dict.fromkeys(("runner.copy_blocks", "compute_logits", "sample", "tree.evict", "_output"), 0.015)
    chaos = Chaos(eng, p=dict.fromkeys(Chaos.POINTS, 0.003) | per_step, seed=5)
    ended: dict[str, object] = {}
    spec_of: dict[str, int] = {}
    submitted = failed_steps = 0
    try:
        while submitted < 300 or eng.has_unfinished():
            for _ in range(min(rng.randrange(0, 6), 300 - submitted)):
                k = rng.randrange(len(specs))
                rid = llm.add_request(*specs[k])
                spec_of[rid] = k
                submitted += 1
            if rng.random() < 0.03:
                live = [r for r in spec_of if r not in ended]
                if live and (out := llm.abort(rng.choice(live))) is not None:
                    ended[out.request_id] = out
            try:
                outs = llm.step()
            except StepError as e:
                failed_steps += 1
                outs = e.outputs
            for o in outs:
                if o.finished:
                    assert o.request_id not in ended, f"{o.request_id} ended twice"
                    ended[o.request_id] = o
            eng.check()
    finally:
        chaos.remove()
    assert len(ended) == submitted == 300  # nothing lost
    assert failed_steps >= 10 and len(chaos.fired) >= 8, chaos.fired  # faults did fire, at most points
    kinds = {"ok": 0, "error": 0, "abort": 0}
    for rid, out in ended.items():
        want = ref[spec_of[rid]]
        for c in out.outputs:
            if c.finish_reason in ("error", "abort"):
                kinds[c.finish_reason] += 1
                assert c.token_ids == want[c.index][:len(c.token_ids)], f"{rid}: not a prefix of the clean output"
            else:
                kinds["ok"] += 1
                assert c.token_ids == want[c.index], f"{rid} sample {c.index} differs from the clean engine"
    assert all(kinds.values()), kinds
    assert llm.metrics()["num_preemptions"] > 0
    only_tree_holds_blocks(llm)


def test_errors_survive_pickling():
    """Tensor-parallel workers send a step's exception back to the calling process pickled."""
    import pickle

    from rrm_engine.outputs import CompletionOutput, RequestOutput
    from rrm_engine.serving import RequestFailedError, RequestTimeoutError

    out = RequestOutput("r1", None, [5], [CompletionOutput(0, "", [7], "error", -1.0)], True, error="X: y")
    e = pickle.loads(pickle.dumps(StepError(InjectedFault("boom"), [out])))
    assert e.request_ids == ["r1"] and isinstance(e.error, InjectedFault) and e.outputs[0].error == "X: y"
    f = pickle.loads(pickle.dumps(RequestFailedError("r1", "failed", out)))
    t = pickle.loads(pickle.dumps(RequestTimeoutError("r1", 2.5, out)))
    assert (f.request_id, str(f), f.output.request_id) == ("r1", "failed", "r1")
    assert (t.request_id, t.timeout, t.output.request_id) == ("r1", 2.5, "r1") and isinstance(t, TimeoutError)
