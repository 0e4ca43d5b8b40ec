"""Prometheus metrics of the server, named as vLLM's with the prefix `flashserve:`.

Each app gets its own CollectorRegistry, so several servers can run in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from flashserve.core.records import RequestRecord

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0)


class ServerMetrics:
    """The server's counters, gauges and histograms, all labelled with `model_name`."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        registry = self.registry

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(f"flashserve:{name}", documentation, labels, registry=registry).labels(model_name)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(f"flashserve:{name}", documentation, labels, registry=registry).labels(model_name)

        def histogram(name: str, documentation: str, buckets) -> Histogram:
            return Histogram(f"flashserve:{name}", documentation, labels, registry=registry, buckets=buckets).labels(
                model_name
            )

        self.num_requests_running = gauge("num_requests_running", "Requests in the running queue.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests in the waiting queue.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use, 0 to 1.")
        self.kv_cache_fragmentation = gauge(
            "kv_cache_fragmentation", "1 - tokens stored / token slots allocated in the KV cache, 0 to 1."
        )
        self.num_preemptions = counter("num_preemptions", "Requests preempted (by recompute).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that got their first token.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._request_success = Counter(
            "flashserve:request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"],
            registry=registry,
        )
        self.model_name = model_name
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first output token, in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens, in seconds.", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to finish, in seconds.", E2E_BUCKETS
        )

    def observe_finished(self, record: RequestRecord) -> None:
        """Count a finished request and observe its latencies."""
        self._request_success.labels(self.model_name, record.finish_reason or "unknown").inc()
        if record.first_token_time is not None:
            self.time_to_first_token.observe(record.first_token_time - record.arrival_time)
        for previous, current in zip(record.token_times, record.token_times[1:]):
            self.inter_token_latency.observe(current - previous)
        if record.finish_time is not None:
            self.e2e_request_latency.observe(record.finish_time - record.arrival_time)

    def render(self) -> bytes:
        """Render the registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
