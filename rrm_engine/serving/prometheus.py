"""The engine's and the judge routes' counters in Prometheus' text exposition format (version 0.0.4).

Known engine metrics get stable names and types; any other numeric engine metric is exported as a
gauge `rrm_engine_<name>` so that nothing the engine reports is hidden."""
from __future__ import annotations

from typing import Any

# engine metric -> (exported name, type, help)
KNOWN = {
    "requests": ("rrm_requests_total", "counter", "Requests added to the engine."),
    "prompt_tokens": ("rrm_prompt_tokens_total", "counter", "Prompt tokens submitted (once per request)."),
    "prefill_tokens_computed": ("rrm_prefill_tokens_total", "counter", "Prompt tokens run through the model."),
    "cached_prefix_tokens": ("rrm_cached_prefix_tokens_total", "counter", "Prompt tokens served from the prefix cache."),
    "generated_tokens": ("rrm_generated_tokens_total", "counter", "Tokens generated."),
    "steps": ("rrm_engine_steps_total", "counter", "Engine steps."),
    "num_preemptions": ("rrm_preemptions_total", "counter", "Sequences preempted."),
    "requests_in_flight": ("rrm_queue_depth", "gauge", "Requests submitted and not yet answered."),
    "requests_queued": ("rrm_requests_queued", "gauge", "Requests submitted and not yet in the engine."),
    "waiting": ("rrm_sequences_waiting", "gauge", "Sequences waiting to be scheduled."),
    "running": ("rrm_sequences_running", "gauge", "Sequences running."),
    "kv_blocks_used": ("rrm_kv_blocks_used", "gauge", "KV blocks in use (running sequences + prefix cache)."),
    "kv_blocks_total": ("rrm_kv_blocks_total", "gauge", "KV blocks in the pool."),
    "kv_blocks_peak": ("rrm_kv_blocks_peak", "gauge", "Most KV blocks in use at once."),
    "kv_use": ("rrm_kv_use_ratio", "gauge", "Fraction of the KV pool in use."),
}


def _line(name: str, kind: str, help_: str, value: float, labels: str = "") -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {float(value)!r}"]


def render(engine_metrics: dict[str, Any], judge_counts: dict[str, int]) -> str:
    lines: list[str] = []
    m = dict(engine_metrics)
    if "kv_use" not in m and m.get("kv_blocks_total"):
        m["kv_use"] = m.get("kv_blocks_used", 0) / m["kv_blocks_total"]
    for key, (name, kind, help_) in KNOWN.items():
        if isinstance(m.get(key), (int, float)):
            lines += _line(name, kind, help_, m[key])
    for key in sorted(m):
        v = m[key]
        if key not in KNOWN and isinstance(v, (int, float)) and not isinstance(v, bool):
            lines += _line(f"rrm_engine_{key}", "gauge", f"Engine metric {key}.", v)
    lines += ["# HELP rrm_judge_votes_total Judge votes served, by kind.", "# TYPE rrm_judge_votes_total counter"]
    for kind in ("valid", "forced", "invalid"):
        lines.append(f'rrm_judge_votes_total{{kind="{kind}"}} {float(judge_counts.get(kind, 0))!r}')
    lines += _line("rrm_judge_comparisons_total", "counter", "Comparisons served by the judge routes.",
                   judge_counts.get("comparisons", 0))
    return "\n".join(lines) + "\n"
