"""The OpenAI-compatible request bodies (/v1/completions, /v1/chat/completions) and the responses
built from the engine's RequestOutputs: plain JSON, and the chunks of a stream (server-sent events).

Every number must be finite (400 naming the field otherwise); ranges and per-request caps are
checked by the server (limits.py). Fields the engine has (n, temperature, top_p, top_k, min_p, max_tokens, stop, seed, logprobs,
ignore_eos, stop_token_ids) map onto SamplingParams. Fields it does not implement are refused when
set to anything but their neutral value (presence/frequency penalties, logit_bias, echo, best_of,
suffix), so a request never runs with a setting silently dropped; other unknown fields are ignored,
as OpenAI clients send several (user, ...).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .limits import BadField


class _Sampling(BaseModel):
    # allow_inf_nan=False: JSON's 1e999 parses as inf and Python's json reads NaN / Infinity; none of
    # them is a setting, and one of them in a batch would fail the engine step of every request in it
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def _refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadField(name, f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise BadField("logit_bias", "logit_bias is not supported")

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        self._refuse_unsupported()
        try:
            return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p,
                                  top_k=0 if self.top_k == -1 else self.top_k,  # -1: off, as vLLM takes it
                                  min_p=self.min_p, max_tokens=max_tokens, stop=self.stop,
                                  stop_token_ids=self.stop_token_ids, seed=self.seed, logprobs=logprobs,
                                  ignore_eos=self.ignore_eos)
        except ValueError as e:  # "SamplingParams: top_p must be ...": name the field
            msg = str(e).removeprefix("SamplingParams: ")
            raise BadField(msg.split(" ", 1)[0], msg) from None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise BadField("prompt", "prompt is empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def params(self) -> SamplingParams:
        if self.echo:
            raise BadField("echo", "echo is not supported")
        if self.suffix:
            raise BadField("suffix", "suffix is not supported")
        if self.best_of not in (None, self.n):
            raise BadField("best_of", "best_of is not supported (leave it unset or equal to n)")
        return self._params(self.max_tokens, self.logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadField("messages", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def params(self, default_max_tokens: int) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise BadField("top_logprobs", "top_logprobs needs logprobs: true")
        budget = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return self._params(budget, (self.top_logprobs or 0) if self.logprobs else None)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------- responses
def _token(tokenizer: Any, tid: int) -> str:
    return tokenizer.decode([tid]) if tokenizer is not None else str(tid)


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
    """OpenAI completions' logprobs object for these tokens (the sampled token's, and the top ones)."""
    if logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for tid, lp in zip(token_ids, logprobs):
        s = _token(tokenizer, tid)
        tokens.append(s)
        token_lps.append(lp.get(tid))
        tops.append({_token(tokenizer, t): v for t, v in sorted(lp.items(), key=lambda kv: -kv[1])})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]] | None, top: int) -> dict | None:
    """OpenAI chat's logprobs object: per token its log-prob and the `top` most likely tokens."""
    if logprobs is None:
        return None
    content = []
    for tid, lp in zip(token_ids, logprobs):
        s = _token(tokenizer, tid)
        ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
        content.append({"token": s, "logprob": lp.get(tid), "bytes": list(s.encode()),
                        "top_logprobs": [{"token": _token(tokenizer, t), "logprob": v,
                                          "bytes": list(_token(tokenizer, t).encode())} for t, v in ranked]})
    return {"content": content}


def usage(outs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    done = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def completion_response(rid: str, model: str, outs: list[RequestOutput], tokenizer: Any) -> dict:
    n = len(outs[0].outputs) if outs else 0
    choices = [{"index": i * n + c.index, "text": c.text, "logprobs": completion_logprobs(tokenizer, c.token_ids, c.logprobs),
                "finish_reason": c.finish_reason} for i, o in enumerate(outs) for c in o.outputs]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(outs)}


def chat_response(rid: str, model: str, out: RequestOutput, tokenizer: Any, top_logprobs: int) -> dict:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(tokenizer, c.token_ids, c.logprobs, top_logprobs), "finish_reason": c.finish_reason}
               for c in out.outputs]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage([out])}
