"""Judge results compared across ways of running the same work (a pool, a server, a batch):
their fields as plain data, every float wrapped in pytest.approx, since log-probs move in the last
digits with how the rows were batched."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest


def approx_fields(result: Any, atol: float) -> Any:
    """dataclasses.asdict(result), with each float as pytest.approx(float, abs=atol) and tuples as lists."""
    def walk(v: Any) -> Any:
        if isinstance(v, float):
            return pytest.approx(v, abs=atol)
        if isinstance(v, dict):
            return {k: walk(w) for k, w in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(w) for w in v]
        return v
    return walk(dataclasses.asdict(result))
