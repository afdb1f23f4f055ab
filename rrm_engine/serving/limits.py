"""What the server admits: per-request caps (Limits), the bound on work in flight (Admission) and the
ASGI gate in front of every route (API key, body size, requests by route and status).

Everything here runs before a request reaches the engine, so that nothing one client sends can fail,
stall or starve another:
  * caps on what one request may ask for (n, votes, items, prompts, candidates, stop strings): 400
    naming the field;
  * a body larger than max_body_bytes: 413, before it is parsed;
  * work in flight (samples x max_tokens of every admitted request, and their number) is bounded:
    past the bound a request gets 429 with Retry-After at once, instead of a queue whose latency
    grows without end. A single request larger than the whole bound gets 413 (it could never run).
Plain Python (no fastapi, no pydantic): the CLI reads the defaults without the serve extra.
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

# sampling values the sampler computes with in float32: a finite float64 can still overflow there
# (temperature 1e300 -> inf) or vanish (top_p 1e-300 -> 0) and fail the whole engine step
MAX_TEMPERATURE = 100.0
MIN_TOP_P = 1e-6
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # vLLM's


@dataclass
class Limits:
    """Per-request caps and the bound on work in flight (`serve` flags of the same names)."""
    max_n: int = 64  # samples per prompt (n)
    max_votes: int = 64  # votes per comparison
    max_items: int = 1024  # items of a judge request, queries of an OpenRLHF request
    max_candidates: int = 64  # candidates of one rank item
    max_prompts: int = 256  # prompts of one /v1/completions request
    max_stop: int = 16  # stop strings (and stop_token_ids) of one request
    max_stop_chars: int = 256  # characters of one stop string
    max_body_bytes: int = 16 * 2 ** 20
    max_pending_requests: int = 1024  # HTTP requests admitted and not yet answered
    # samples x max_tokens of every admitted request; None: 16 x the KV pool's tokens
    max_pending_tokens: int | None = None

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is None and name == "max_pending_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be an int >= 1, got {value!r}")


class BadField(ValueError):
    """A request field the server refuses: answered 400 with the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Overloaded(Exception):
    """Work in flight is at its bound: answered 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(Exception):
    """One request is larger than the server admits at all: answered 413."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Admission:
    """Counts the work of admitted requests; `reserve` refuses what would go past the bound.

    Work is measured as samples x max_tokens (the generation budget a request may use), plus one
    request. The bound is on everything admitted, queued in the engine or running: the engine
    batches what it holds, and what is past the bound is refused at once with a Retry-After from
    the engine's recent speed, so that a client's retry meets a shorter queue, never a longer one."""

    def __init__(self, max_requests: int, max_tokens: int, tokens_per_s: Callable[[], float] | None = None):
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self._tokens_per_s = tokens_per_s or (lambda: 0.0)
        self._lock = threading.Lock()
        self.requests = 0
        self.tokens = 0
        self.refused = 0

    def reserve(self, tokens: int, what: str = "request") -> "Ticket":
        tokens = max(int(tokens), 0)
        if tokens > self.max_tokens:
            raise TooLarge(f"this {what} asks for {tokens} tokens of work (samples x max_tokens); the server admits "
                           f"at most {self.max_tokens} at once: split it into smaller requests")
        with self._lock:
            if self.requests + 1 > self.max_requests or self.tokens + tokens > self.max_tokens:
                self.refused += 1
                excess = self.tokens + tokens - self.max_tokens
                raise Overloaded(f"the server is at its bound of work in flight ({self.requests} requests, "
                                 f"{self.tokens} of {self.max_tokens} tokens): retry later",
                                 self._retry_after(excess))
            self.requests += 1
            self.tokens += tokens
        return Ticket(self, tokens)

    def _retry_after(self, excess: int) -> int:
        """Seconds until about `excess` tokens of work are done at the engine's recent speed (1..60)."""
        speed = self._tokens_per_s()
        if not speed or not math.isfinite(speed) or excess <= 0:
            return 1
        return int(min(60, max(1, math.ceil(excess / speed))))

    def _release(self, tokens: int) -> None:
        with self._lock:
            self.requests -= 1
            self.tokens -= tokens


class Ticket:
    """An admitted request's share of the bound; release() (idempotent) gives it back."""

    def __init__(self, admission: Admission, tokens: int):
        self._admission, self.tokens, self._held = admission, tokens, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self.tokens)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------- field checks
def cap(field: str, value: int, limit: int, flag: str) -> None:
    if value > limit:
        raise BadField(field, f"{field}: {value} is more than this server takes ({limit}; serve {flag})")


def check_sampling(body: Any, limits: Limits, vocab_size: int | None, max_model_len: int | None) -> None:
    """Ranges of the OpenAI sampling fields, beyond pydantic's finiteness check (allow_inf_nan=False):
    values the engine would accept but that fail in float32, caps, and max_tokens within the context."""
    cap("n", body.n, limits.max_n, "--max-n")
    if not 0 <= body.temperature <= MAX_TEMPERATURE:
        raise BadField("temperature", f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {body.temperature!r}")
    if not MIN_TOP_P <= body.top_p <= 1:
        raise BadField("top_p", f"top_p must be in [{MIN_TOP_P:g}, 1], got {body.top_p!r}")
    if not 0 <= body.min_p <= 1:
        raise BadField("min_p", f"min_p must be in [0, 1], got {body.min_p!r}")
    if body.top_k < -1 or (vocab_size is not None and body.top_k > vocab_size):
        raise BadField("top_k", f"top_k must be in [0, {vocab_size}] (0 or -1: off), got {body.top_k!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(body, name) <= 2:
            raise BadField(name, f"{name} must be in [-2, 2], got {getattr(body, name)!r}")
    for key, value in (body.logit_bias or {}).items():
        if not -100 <= value <= 100:
            raise BadField("logit_bias", f"logit_bias[{key!r}] must be in [-100, 100], got {value!r}")
    if body.seed is not None and not SEED_RANGE[0] <= body.seed <= SEED_RANGE[1]:
        raise BadField("seed", f"seed must be a 64-bit integer, got {body.seed!r}")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    cap("stop", len(stops), limits.max_stop, "--max-stop")
    for s in stops:
        if len(s) > limits.max_stop_chars:
            raise BadField("stop", f"stop strings are at most {limits.max_stop_chars} characters "
                                     f"(serve --max-stop-chars), got one of {len(s)}")
    cap("stop_token_ids", len(body.stop_token_ids or []), limits.max_stop, "--max-stop")
    for name in ("max_tokens", "max_completion_tokens"):
        v = getattr(body, name, None)
        if v is not None and max_model_len is not None and v > max_model_len:
            raise BadField(name, f"{name}={v} is more than the model's context ({max_model_len} tokens)")


def fit_budget(field: str, prompt_len: int, max_tokens: int | None, default: int, max_model_len: int | None) -> int:
    """max_tokens for this prompt: an explicit one must fit the context with the prompt (400 naming
    the field otherwise, as vLLM answers); an unset one is the default, cut to what the context leaves."""
    if max_model_len is None:
        return max_tokens if max_tokens is not None else default
    room = max_model_len - prompt_len
    if room < 1:
        raise BadField("prompt", f"prompt of {prompt_len} tokens does not fit the model's context of "
                                   f"{max_model_len} tokens (it must leave room for one generated token)")
    if max_tokens is None:
        return min(default, room)
    if max_tokens > room:
        raise BadField(field, f"{field}={max_tokens} does not fit: the prompt has {prompt_len} tokens and the "
                                f"model's context {max_model_len} (at most {room} for this prompt)")
    return max_tokens


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of this tokenizer stands for (byte-level BPE: bytes; special
    tokens count too). A text of c characters is then at least ceil(c / this) tokens, which bounds
    the token count of a prompt from its length without tokenising it."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # no vocabulary to read: assume nothing (every text must be tokenised)
        return 0
    return max((len(t) for t in vocab), default=0)


def check_chars(field: str, chars: int, per_token: int, max_model_len: int | None) -> None:
    """Refuse a text that cannot fit the context whatever it tokenises to, before tokenising it
    (a 22 MB prompt is refused in microseconds, not after seconds of tokenisation)."""
    if per_token and max_model_len is not None and chars > per_token * max_model_len:
        raise BadField(field, f"{field} of {chars} characters is at least {-(-chars // per_token)} tokens, more "
                                f"than the model's context of {max_model_len}")


# ---------------------------------------------------------------------------------- ASGI
def is_loopback(host: str) -> bool:
    """Whether `serve --host host` listens on this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers and probes)

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


class Gate:
    """ASGI middleware in front of every route: the API key (Authorization: Bearer, or Basic with the
    key as password; compared in constant time; every path but /health), the body size (413 before anything is parsed: from Content-Length, or counted
    as a chunked body arrives), and the requests counter by route and status (on_done)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int,
                 on_done: Callable[[str, str, int, float], None] | None = None):
        self.app, self.max_body_bytes, self.on_done = app, max_body_bytes, on_done
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = scope["rrm_t0"] = time.perf_counter()  # the routes' queue time and time to first token count from here
        status = {"code": 500}

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._gate(scope, receive, sending)
        finally:
            if self.on_done is not None:
                # the route's template; unknown paths share one label (a client must not grow the label set)
                path = getattr(scope.get("route"), "path", None) or "other"
                self.on_done(scope["method"], path, status["code"], time.perf_counter() - t0)

    async def _gate(self, scope: dict, receive: Receive, send: Send) -> None:
        if self._key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return await _answer(send, 401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                                 "authentication_error", extra=[(b"www-authenticate", b"Bearer")])
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _answer(send, 400, "Content-Length is not a number", "invalid_request_error")
            if declared > self.max_body_bytes:
                return await _answer(send, 413, self._too_large(declared), "request_too_large")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the body here, counting, so that a chunked body cannot go past the bound either
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _answer(send, 413, self._too_large(size, at_least=True), "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replayed() -> dict:
            nonlocal replay
            if replay is not None:
                message, replay = replay, None
                return message
            return await receive()  # then the client's disconnect, which the routes watch for

        await self.app(scope, replayed, send)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (f"the request body is {'more than ' if at_least else ''}{size} bytes; this server takes at most "
                f"{self.max_body_bytes} (serve --max-body-bytes)")

    def _authorized(self, scope: dict) -> bool:
        """Bearer <key> (OpenAI / vLLM clients), or Basic auth whose password is the key: what a
        client that only takes a URL sends for http://user:<key>@host/ (OpenRLHF's remote reward
        client posts with `requests`, which turns the URL's credentials into that header)."""
        given = _header(scope, b"authorization") or b""
        scheme, _, token = given.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() == b"basic":
            try:
                token = base64.b64decode(token, validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme.lower() != b"bearer":
            return False
        # compare_digest over bytes: its time does not depend on where the key and the token differ
        return hmac.compare_digest(token, self._key)


def _header(scope: dict, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


async def _answer(send: Send, status: int, message: str, kind: str, extra: list | None = None) -> None:
    import json

    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
