"""Prometheus metrics of one gateway (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rose_gateway_requests", "requests answered, by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("rose_gateway_request_seconds", "request latency, end to end", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("rose_gateway_time_to_first_token_seconds", "time to the first streamed delta", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("rose_gateway_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("rose_gateway_completion_tokens", "generated tokens of finished requests", registry=r)
        self.in_flight = Gauge("rose_gateway_requests_in_flight", "requests being generated", registry=r)
        self.formatters_live = Gauge("rose_gateway_formatters_live", "formatters that answered their last ping in time", registry=r)
        self.aborted = Counter("rose_gateway_aborted_requests", "requests aborted before they finished (the abort goes down every hop), by reason", ["reason"], registry=r)
        self.draining = Gauge("rose_gateway_draining", "1 while the gateway drains after SIGTERM", registry=r)
        self.rejected = Counter("rose_gateway_rejected_requests", "requests answered with an error before or instead of generation, by HTTP status", ["status"], registry=r)
