"""A request (one prompt, n samples) and its sequences (one per sample, after the fork)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..cache.radix_cache import Node
from ..sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (holds no blocks)
    RUNNING = "running"  # holds blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order: earlier requests are scheduled first and preempted last
    base_seed: int  # params.seed, or drawn from the engine's generator
    seqs: list["Sequence"] = field(default_factory=list)
    forked: bool = False  # the n-1 siblings exist (after the prompt's prefill)
    num_cached_tokens: int = 0
    error: str | None = None  # why it failed (its samples then finish with "error")
    stream: bool = False  # an output after every step that gives it tokens (see Engine.add_request)

    @property
    def finished(self) -> bool:
        return self.forked and all(s.status is Status.FINISHED for s in self.seqs)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # sample index: its seed and its place in the RequestOutput
    seed: int
    tokens: list[int]  # prompt + generated
    prompt_len: int
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    tree_node: Node | None = None  # deepest tree node of its full blocks; None: stop inserting
    num_tree_blocks: int = 0  # leading blocks of block_table that are in the tree chain
    prefill_done: bool = False  # True once every token up to the last has been computed once
    cumulative_logprob: float = 0.0
    sampling_logprobs: list[float] = field(default_factory=list)  # per generated token, see outputs.py
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    detok: object | None = None  # IncrementalDetokenizer when stop strings are set
    stop_text: str | None = None  # final text when a stop string ended it

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def priority(self) -> tuple[int, int]:
        return (self.request.arrival, self.index)
