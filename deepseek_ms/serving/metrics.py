"""Prometheus metrics of the OpenAI API process, in a registry of its own (no global state).
Engine gauges are refreshed from the engine server's health reply at each scrape."""
from __future__ import annotations

from typing import Any, Dict, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "deepseek_ms_"
        self.requests = Counter(p + "http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from request to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Time between output tokens",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Time from request to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(p + "api_requests_in_flight", "Requests being handled by this API process",
                               registry=r)
        self.engine_up = Gauge(p + "engine_up", "1 if the engine server answered the last health check",
                               registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests in the engine's running batch", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests queued in the engine", registry=r)
        self.cache_usage = Gauge(p + "cache_usage_ratio", "Fraction of the engine's cache blocks in use",
                                 registry=r)

    def set_engine(self, health: Optional[Dict[str, Any]]) -> None:
        self.engine_up.set(1 if health else 0)
        stats = (health or {}).get("stats") or {}
        self.running.set(stats.get("num_running", 0))
        self.waiting.set(stats.get("num_waiting", 0))
        self.cache_usage.set(stats.get("cache_usage", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
