"""Cumulative engine counters: plain Python integers, updated once per step."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Metrics:
    requests: int = 0
    prompt_tokens: int = 0  # prompt tokens submitted (once per request, whatever n)
    prefill_tokens_computed: int = 0  # tokens run through the model that were not decode steps
    cached_prefix_tokens: int = 0  # tokens whose KV came from the prefix cache at admission
    generated_tokens: int = 0
    decode_tokens_computed: int = 0
    steps: int = 0
    num_preemptions: int = 0
    num_deferred: int = 0  # admissions put off one step to share a leader's prefix
    step_time_s: float = 0.0  # wall time inside step()
    failed_steps: int = 0  # steps that raised and were rolled back
    failed_requests: int = 0  # requests failed by those steps, or stopped for NaN/inf logits (the batch going on)

    def as_dict(self, kv_blocks_peak: int, kv_blocks_total: int, kv_blocks_used: int) -> dict:
        d = asdict(self)
        seen = self.cached_prefix_tokens + self.prefill_tokens_computed
        d["prefix_hit_rate"] = self.cached_prefix_tokens / seen if seen else 0.0
        d["tokens_per_s"] = self.generated_tokens / self.step_time_s if self.step_time_s else 0.0
        # blocks not on the free list: running sequences plus the prefix cache
        d["kv_blocks_peak"] = kv_blocks_peak
        d["kv_blocks_used"] = kv_blocks_used
        d["kv_blocks_total"] = kv_blocks_total
        return d
