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
