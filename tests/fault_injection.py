"""Fault injection for engine tests: make a real engine's step raise once at a chosen point
(wrap a method, or register Fault.hook as a forward hook on a decoder layer)."""
from __future__ import annotations


class InjectedFault(RuntimeError):
    pass


class Fault:
    """Wraps fn; the at-th call for which `when(*args)` holds raises InjectedFault instead, once.
    Records which requests the failing step had touched at that moment."""

    def __init__(self, engine, fn, at: int, when=lambda *a, **k: True, exc: type[BaseException] = InjectedFault):
        self.engine, self.fn, self.at, self.when, self.exc = engine, fn, at, when, exc
        self.calls, self.fired, self.touched = 0, False, set()

    def trip(self, *args, **kwargs) -> bool:
        if self.fired or not self.when(*args, **kwargs):
            return False
        self.calls += 1
        if self.calls < self.at:
            return False
        self.fired = True
        sched = self.engine._running_step or self.engine.scheduler.current
        self.touched = {s.request.request_id for s in sched.touched} if sched is not None else set()
        return True

    def __call__(self, *args, **kwargs):
        if self.trip(*args, **kwargs):
            raise self.exc(f"injected fault in {getattr(self.fn, '__name__', self.fn)}")
        return self.fn(*args, **kwargs)

    def hook(self, module, args, output):  # as a forward hook
        if self.trip():
            raise self.exc("injected fault in a decoder layer")


class Chaos:
    """Random faults at every point of a step: each wrapped call (and each decoder-layer forward)
    raises InjectedFault with probability p (a float, or {point: probability} with default 0),
    drawn from a seeded generator."""

    POINTS = ("pool.allocate", "tree.insert_full", "tree.evict", "runner.copy_blocks", "layer", "compute_logits",
              "sample", "_fork", "_append", "_output")

    def __init__(self, engine, p: "float | dict[str, float]", seed: int):
        import random

        import rrm_engine.core.engine as engine_mod
        self.engine, self.p, self.rng = engine, p, random.Random(seed)
        self.fired: dict[str, int] = {}
        self._undo = []
        targets = {"pool.allocate": (engine.pool, "allocate"), "tree.insert_full": (engine.tree, "insert_full"),
                   "tree.evict": (engine.tree, "evict"), "runner.copy_blocks": (engine.runner, "copy_blocks"),
                   "compute_logits": (engine.model, "compute_logits"), "sample": (engine_mod, "sample"),
                   "_fork": (engine, "_fork"), "_append": (engine, "_append"), "_output": (engine, "_output")}
        for name, (obj, attr) in targets.items():
            self._wrap(name, obj, attr)
        for layer in engine.model.model.layers:
            h = layer.register_forward_hook(lambda m, a, o: self._maybe("layer"))
            self._undo.append(h.remove)

    def _wrap(self, name, obj, attr):
        fn = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            if kwargs.get("with_text", True):  # _output without text does not decode: nothing to fail
                self._maybe(name)
            return fn(*args, **kwargs)
        setattr(obj, attr, wrapped)
        self._undo.append(lambda: setattr(obj, attr, fn))

    def _maybe(self, name: str) -> None:
        p = self.p.get(name, 0.0) if isinstance(self.p, dict) else self.p
        if p and self.rng.random() < p:
            self.fired[name] = self.fired.get(name, 0) + 1
            raise InjectedFault(f"chaos at {name}")

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []
