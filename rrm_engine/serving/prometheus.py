"""/metrics through prometheus_client: one registry per app (so that several servers in one process,
as in the tests, never share series).

Exported (names as they appear in the text; `_total`, `_bucket`, `_sum`, `_count` are
prometheus_client's suffixes):
  engine, read at scrape time from AsyncLLM.metrics():
    rrm_requests_total, rrm_prompt_tokens_total, rrm_prefill_tokens_total, rrm_cached_prefix_tokens_total,
    rrm_generated_tokens_total, rrm_engine_steps_total, rrm_preemptions_total, rrm_failed_steps_total,
    rrm_failed_requests_total (counters); rrm_queue_depth (requests submitted, not answered),
    rrm_requests_queued, rrm_sequences_waiting, rrm_sequences_running, rrm_kv_blocks_used,
    rrm_kv_blocks_total, rrm_kv_blocks_peak, rrm_kv_use_ratio (gauges); any other numeric engine
    metric as the gauge rrm_engine_<name>, so that nothing the engine reports is hidden.
  server:
    rrm_http_requests_total{method, route, status}   every answer, refusals (400/401/413/429) included
    rrm_pending_requests, rrm_pending_tokens         admitted work (limits.py), and the bound as
    rrm_pending_tokens_limit                         ... its gauge
    rrm_e2e_request_latency_seconds{route}           arrival to the last byte of the answer's body
                                                     being produced (streams: to their end)
    rrm_request_queue_time_seconds                   arrival to submission to the engine (admission,
                                                     tokenisation in the worker thread)
    rrm_time_to_first_token_seconds                  arrival to the first token, streamed requests
    rrm_time_per_output_token_seconds                then per further token, streamed requests
                                                     (a plain request's tokens are not seen one by one)
    rrm_judge_votes_total{kind}, rrm_judge_comparisons_total, rrm_judge_votes_per_comparison
  vLLM-compatible aliases (label model_name), for dashboards built on vLLM's names:
    vllm:prompt_tokens_total, vllm:generation_tokens_total, vllm:num_requests_running,
    vllm:num_requests_waiting, vllm:kv_cache_usage_perc (a fraction, as vLLM's), vllm:num_preemptions_total,
    vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total (tokens), and the histograms
    vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds, vllm:time_to_first_token_seconds,
    vllm:time_per_output_token_seconds.
  data-parallel serving (serve --data-parallel-size N; the series above are then the front's totals,
  summed over the live replicas), per replica with the label replica="i" (its slot, 0..N-1; a
  restarted replica keeps its slot and starts its counters at 0):
    rrm_replica_generated_tokens_total, rrm_replica_prompt_tokens_total, rrm_replica_prefill_tokens_total,
    rrm_replica_requests_total (counters); rrm_replica_queue_depth, rrm_replica_sequences_waiting,
    rrm_replica_sequences_running, rrm_replica_kv_use_ratio (gauges);
    rrm_replicas_live, rrm_replicas_configured (gauges), rrm_replica_deaths_total,
    rrm_replica_restarts_total, rrm_replica_resubmitted_total (counters).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# engine metric -> (exported name without _total, type, help)
KNOWN = {
    "requests": ("rrm_requests", "counter", "Requests added to the engine."),
    "prompt_tokens": ("rrm_prompt_tokens", "counter", "Prompt tokens submitted (once per request)."),
    "prefill_tokens_computed": ("rrm_prefill_tokens", "counter", "Prompt tokens run through the model."),
    "cached_prefix_tokens": ("rrm_cached_prefix_tokens", "counter", "Prompt tokens served from the prefix cache."),
    "generated_tokens": ("rrm_generated_tokens", "counter", "Tokens generated."),
    "steps": ("rrm_engine_steps", "counter", "Engine steps."),
    "num_preemptions": ("rrm_preemptions", "counter", "Sequences preempted."),
    "failed_steps": ("rrm_failed_steps", "counter", "Engine steps that raised and were rolled back."),
    "failed_requests": ("rrm_failed_requests", "counter", "Requests failed by a failed step or by NaN/inf logits."),
    "requests_in_flight": ("rrm_queue_depth", "gauge", "Requests submitted and not yet answered."),
    "requests_queued": ("rrm_requests_queued", "gauge", "Requests submitted and not yet in the engine."),
    "waiting": ("rrm_sequences_waiting", "gauge", "Sequences waiting to be scheduled."),
    "running": ("rrm_sequences_running", "gauge", "Sequences running."),
    "kv_blocks_used": ("rrm_kv_blocks_used", "gauge", "KV blocks in use (running sequences + prefix cache)."),
    "kv_blocks_total": ("rrm_kv_blocks_total", "gauge", "KV blocks in the pool."),
    "kv_blocks_peak": ("rrm_kv_blocks_peak", "gauge", "Most KV blocks in use at once."),
    "kv_use": ("rrm_kv_use_ratio", "gauge", "Fraction of the KV pool in use."),
}

# vLLM's name -> (engine metric, type)
VLLM = {
    "vllm:prompt_tokens": ("prompt_tokens", "counter"),
    "vllm:generation_tokens": ("generated_tokens", "counter"),
    "vllm:num_preemptions": ("num_preemptions", "counter"),
    "vllm:prefix_cache_hits": ("cached_prefix_tokens", "counter"),
    "vllm:prefix_cache_queries": ("prefix_queries", "counter"),
    "vllm:num_requests_running": ("running", "gauge"),
    "vllm:num_requests_waiting": ("waiting", "gauge"),
    "vllm:kv_cache_usage_perc": ("kv_use", "gauge"),
}

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
VOTE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _EngineCollector:
    """Reads the engine's metrics (and the server's admission gauges) when /metrics is scraped."""

    def __init__(self, engine_metrics: Callable[[], dict], model_name: str,
                 pending: Callable[[], tuple[int, int, int]]):
        self.engine_metrics, self.model_name, self.pending = engine_metrics, model_name, pending

    def describe(self) -> list[Metric]:
        return []  # names depend on what the engine reports; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        m = dict(self.engine_metrics())
        if "kv_use" not in m and m.get("kv_blocks_total"):
            m["kv_use"] = m.get("kv_blocks_used", 0) / m["kv_blocks_total"]
        m["prefix_queries"] = m.get("cached_prefix_tokens", 0) + m.get("prefill_tokens_computed", 0)
        for key, (name, kind, help_) in KNOWN.items():
            if _number(m.get(key)):
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, help_, value=m[key])
        for key in sorted(m):
            if key not in KNOWN and key != "prefix_queries" and _number(m[key]):
                yield GaugeMetricFamily(f"rrm_engine_{key}", f"Engine metric {key}.", value=m[key])
        for name, (key, kind) in VLLM.items():
            if _number(m.get(key)):
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                f = family(name, f"vLLM-compatible alias of the engine's {key}.", labels=["model_name"])
                f.add_metric([self.model_name], m[key])
                yield f
        requests, tokens, limit = self.pending()
        yield GaugeMetricFamily("rrm_pending_requests", "HTTP requests admitted and not yet answered.", value=requests)
        yield GaugeMetricFamily("rrm_pending_tokens", "Work admitted and not yet done (samples x max_tokens).",
                                value=tokens)
        yield GaugeMetricFamily("rrm_pending_tokens_limit", "The bound on rrm_pending_tokens (429 past it).",
                                value=limit)


# engine metric -> (per-replica name without _total, type, help)
PER_REPLICA = {
    "generated_tokens": ("rrm_replica_generated_tokens", "counter", "Tokens generated, per replica."),
    "prompt_tokens": ("rrm_replica_prompt_tokens", "counter", "Prompt tokens submitted, per replica."),
    "prefill_tokens_computed": ("rrm_replica_prefill_tokens", "counter", "Prompt tokens run through the model, "
                                                                         "per replica."),
    "requests": ("rrm_replica_requests", "counter", "Requests added to the engine, per replica."),
    "requests_in_flight": ("rrm_replica_queue_depth", "gauge", "Requests submitted and not answered, per replica."),
    "waiting": ("rrm_replica_sequences_waiting", "gauge", "Sequences waiting, per replica."),
    "running": ("rrm_replica_sequences_running", "gauge", "Sequences running, per replica."),
    "kv_use": ("rrm_replica_kv_use_ratio", "gauge", "Fraction of the KV pool in use, per replica."),
}


class _ReplicaCollector:
    """Per-replica series of a data-parallel server (a judge.pool.JudgePool), read at scrape time."""

    def __init__(self, pool: Any):
        self.pool = pool

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        per = self.pool.replica_metrics()
        for key, (name, kind, help_) in PER_REPLICA.items():
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_, labels=["replica"])
            for i in sorted(per):
                m = per[i]
                if key == "kv_use" and "kv_use" not in m and m.get("kv_blocks_total"):
                    m["kv_use"] = m.get("kv_blocks_used", 0) / m["kv_blocks_total"]
                if _number(m.get(key)):
                    family.add_metric([str(i)], m[key])
            yield family
        yield GaugeMetricFamily("rrm_replicas_live", "Replicas serving now.", value=len(self.pool.live()))
        yield GaugeMetricFamily("rrm_replicas_configured", "Replicas asked for (--data-parallel-size).",
                                value=self.pool.num_replicas)
        s = self.pool.stats
        yield CounterMetricFamily("rrm_replica_deaths", "Replicas that died.", value=s.replicas_died)
        yield CounterMetricFamily("rrm_replica_restarts", "Replacements started after a death.",
                                  value=s.replicas_started)
        yield CounterMetricFamily("rrm_replica_resubmitted", "Items and requests sent again after their replica "
                                                             "died.", value=s.resubmitted_items)


class _Twin:
    """A histogram observed under our name and under vLLM's (labelled with the model name)."""

    def __init__(self, ours: Histogram, vllm: Any):
        self.ours, self.vllm = ours, vllm

    def observe(self, value: float) -> None:
        self.ours.observe(value)
        self.vllm.observe(value)


class ServerMetrics:
    def __init__(self, engine_metrics: Callable[[], dict], model_name: str,
                 pending: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0), judgments: Any = None,
                 replicas: Any = None):
        """replicas: a judge.pool.JudgePool, whose replicas get series of their own (label replica)."""
        # no `_created` series beside every counter and histogram (process-wide, as vLLM sets it):
        # they double the text for a timestamp no dashboard reads
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        r.register(_EngineCollector(engine_metrics, model_name, pending))
        if replicas is not None:
            r.register(_ReplicaCollector(replicas))
        if judgments is not None:  # idempotency.Judgments: keyed judgments started, joined, replayed, abandoned
            r.register(judgments)

        def twin(name: str, help_: str, buckets: tuple) -> _Twin:
            ours = Histogram(f"rrm_{name}", help_, buckets=buckets, registry=r)
            theirs = Histogram(f"vllm:{name}", help_ + " (vLLM-compatible alias)", ["model_name"], buckets=buckets,
                               registry=r)
            return _Twin(ours, theirs.labels(model_name))

        self.http = Counter("rrm_http_requests", "HTTP requests answered, by method, route and status.",
                            ["method", "route", "status"], registry=r)
        self.e2e = Histogram("rrm_e2e_request_latency_seconds", "Arrival to the end of the answer, by route.",
                             ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self._e2e_vllm = Histogram("vllm:e2e_request_latency_seconds", "Arrival to the end of the answer "
                                   "(vLLM-compatible alias, every route).", ["model_name"], buckets=LATENCY_BUCKETS,
                                   registry=r).labels(model_name)
        self.queue = twin("request_queue_time_seconds", "Arrival to submission to the engine.", LATENCY_BUCKETS)
        self.ttft = twin("time_to_first_token_seconds", "Arrival to the first token (streamed requests).",
                         LATENCY_BUCKETS)
        self.tpot = twin("time_per_output_token_seconds", "Time per token after the first (streamed requests).",
                         TOKEN_BUCKETS)
        self.votes = Counter("rrm_judge_votes", "Judge votes served, by kind.", ["kind"], registry=r)
        for kind in ("valid", "forced", "invalid"):
            self.votes.labels(kind)  # present from the start, at 0
        self.comparisons = Counter("rrm_judge_comparisons", "Comparisons served by the judge routes.", registry=r)
        self.votes_per_comparison = Histogram("rrm_judge_votes_per_comparison", "Votes a comparison used.",
                                              buckets=VOTE_BUCKETS, registry=r)

    def request_done(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http.labels(method, route, str(status)).inc()
        if status < 400:
            self.e2e.labels(route).observe(seconds)
            self._e2e_vllm.observe(seconds)

    def judged(self, stats: dict, votes_each: list[int]) -> None:
        for kind in ("valid", "forced", "invalid"):
            self.votes.labels(kind).inc(int(stats.get(kind, 0)))
        self.comparisons.inc(int(stats.get("comparisons", 0)))
        for v in votes_each:
            self.votes_per_comparison.observe(v)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class InvalidAlarmCollector:
    """The judge's invalid-rate alarm (judge/alarm.py) on /metrics: 1 while most votes of the recent
    window are invalid, how often it tripped, and the window's invalid share."""

    def __init__(self, alarm: Any):
        self.alarm = alarm

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.alarm.metrics()
        yield GaugeMetricFamily("rrm_judge_invalid_alarm", "1 while most votes of the recent window are invalid.",
                                value=float(bool(m["invalid_alarm"])))
        yield CounterMetricFamily("rrm_judge_invalid_alarm_trips", "Times the invalid-rate alarm tripped.",
                                  value=float(m["invalid_alarm_trips"]))
        yield GaugeMetricFamily("rrm_judge_window_invalid_rate", "Invalid share of the recent window of votes.",
                                value=float(m["window_invalid_rate"]))
