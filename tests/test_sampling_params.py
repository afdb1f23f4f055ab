"""SamplingParams refuses every value the engine cannot sample with, naming the field first (the
server turns the name into its 400's field): non-finite or out-of-range numbers, bools where
numbers go, ints too large for the samplers' tensors (issue 22, item 1)."""
from __future__ import annotations

import json
import math

import pytest

from rrm_engine import SamplingParams
from rrm_engine.sampling_params import MAX_INT32, MAX_TEMPERATURE, MIN_TEMPERATURE
from rrm_engine.serving.openai_api import BadField, ChatRequest, CompletionRequest

INF, NAN = float("inf"), float("nan")
BAD = [
    ("temperature", INF), ("temperature", -INF), ("temperature", NAN), ("temperature", -0.1),
    ("temperature", MAX_TEMPERATURE * 1.01), ("temperature", 1e300), ("temperature", MIN_TEMPERATURE / 2),
    ("temperature", 1e-50), ("temperature", True), ("temperature", "1.0"), ("temperature", None),
    ("top_p", NAN), ("top_p", INF), ("top_p", 0.0), ("top_p", 1.0000001), ("top_p", True),
    ("top_k", -1), ("top_k", MAX_INT32 + 1), ("top_k", 2.0), ("top_k", True),
    ("min_p", NAN), ("min_p", -0.01), ("min_p", 1.5), ("min_p", -INF),
    ("n", 0), ("n", True), ("n", 1.0), ("n", MAX_INT32 + 1),
    ("max_tokens", 0), ("max_tokens", False), ("max_tokens", 2.5), ("max_tokens", 1 << 40),
    ("seed", 1.5), ("seed", True), ("seed", 1 << 64), ("seed", -(1 << 63) - 1),
    ("logprobs", -1), ("logprobs", True), ("logprobs", 1.0),
    ("stop", 3), ("stop", [""]), ("stop", ["a", 1]), ("stop", [b"x"]),
    ("stop_token_ids", [-2]), ("stop_token_ids", [True]), ("logprob_token_ids", [1.0]),
    ("ignore_eos", 1), ("ignore_eos", "yes"), ("include_stop_str_in_output", 0),
]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_value_is_refused_naming_its_field(field, value):
    with pytest.raises(ValueError, match=f"^SamplingParams: {field}") as err:
        SamplingParams(**{field: value})
    assert "got" in str(err.value) or field == "stop"


GOOD = [dict(temperature=0), dict(temperature=0.0), dict(temperature=MIN_TEMPERATURE), dict(temperature=MAX_TEMPERATURE),
        dict(temperature=2), dict(top_p=1), dict(top_p=1e-9), dict(min_p=0), dict(min_p=1), dict(top_k=MAX_INT32),
        dict(seed=0), dict(seed=-(1 << 63)), dict(seed=(1 << 64) - 1), dict(n=3, logprobs=0), dict(stop=("a", "b")),
        dict(max_tokens=MAX_INT32), dict(ignore_eos=True)]


@pytest.mark.parametrize("kwargs", GOOD, ids=[str(k) for k in GOOD])
def test_edge_values_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    assert p.sampler_problem(vocab_size=100) is None


def test_sampler_problem_checks_values_changed_after_construction():
    p = SamplingParams(temperature=0.7, logprobs=3, logprob_token_ids=[5])
    assert p.sampler_problem(10) is None
    p.temperature = INF
    assert p.sampler_problem().startswith("temperature")
    p.temperature = 0.7
    p.logprobs = 11
    assert p.sampler_problem() is None and p.sampler_problem(10).startswith("logprobs=11")
    p.logprobs = 3
    p.logprob_token_ids = [10]
    assert p.sampler_problem(10).startswith("logprob_token_ids")
    with pytest.raises(ValueError, match="logprob_token_ids"):
        p.check_vocab(10)


def test_json_overflow_is_refused_naming_the_field():
    """The issue's request: "temperature": 1e999 is valid JSON that Python reads as inf."""
    body = json.loads('{"temperature": 1e999, "max_tokens": 4}')
    assert math.isinf(body["temperature"])
    with pytest.raises(ValueError, match="^SamplingParams: temperature must be 0"):
        SamplingParams(**body)


def test_the_server_models_name_the_field_of_a_refused_value():
    """The OpenAI models turn SamplingParams' ValueError into BadField(its first word): every
    message must start with the field's name (values the models accept, refused by SamplingParams)."""
    for field, value in (("temperature", MAX_TEMPERATURE * 10), ("temperature", 1e-9), ("top_k", 1 << 40),
                         ("top_p", 1.5), ("min_p", -0.5), ("n", 0)):
        with pytest.raises(BadField) as err:
            CompletionRequest(prompt="x", **{field: value}).params()
        assert err.value.field == field, str(err.value)
        chat = {"messages": [{"role": "user", "content": "x"}], field: value}
        with pytest.raises(BadField) as err:
            ChatRequest(**chat).params(16)
        assert err.value.field == field
