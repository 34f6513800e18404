"""Prometheus metrics: queue depth, jobs done/failed, tokens/s, latency, event-loop lag.

The metrics always exist (in a registry of their own, so several bots can live in one test
process); they are served over HTTP only when ``METRICS_PORT`` is set, on ``METRICS_HOST``
(127.0.0.1 by default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)


class Metrics:
    """The bot's metrics; ``serve`` starts the HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge(
            "htmlbot_queue_depth", "Jobs waiting in the queue", registry=self.registry
        )
        self.running = Gauge("htmlbot_jobs_running", "Jobs in the engine", registry=self.registry)
        self.jobs = Counter("htmlbot_jobs", "Jobs by outcome", ["outcome"], registry=self.registry)
        self.rejected = Counter(
            "htmlbot_rejected",
            "Requests refused before queueing",
            ["reason"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "htmlbot_generated_tokens",
            "Tokens generated for delivered pages",
            registry=self.registry,
        )
        self.tokens_per_second = Gauge(
            "htmlbot_tokens_per_second",
            "Measured engine throughput (all sequences)",
            registry=self.registry,
        )
        self.latency = Histogram(
            "htmlbot_job_latency_seconds",
            "From /html to the page being sent",
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900),
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "htmlbot_event_loop_lag_seconds", "Latest event-loop lag", registry=self.registry
        )
        self._server: Any = None
        self.port: int | None = None

    def job_done(self, latency_s: float, tokens: int) -> None:
        self.jobs.labels("done").inc()
        self.tokens.inc(tokens)
        self.latency.observe(latency_s)

    def job_failed(self) -> None:
        self.jobs.labels("failed").inc()

    def job_cancelled(self) -> None:
        self.jobs.labels("cancelled").inc()

    def job_expired(self) -> None:
        self.jobs.labels("expired").inc()

    def bind(
        self,
        queued: Callable[[], float],
        running: Callable[[], float],
        tokens_per_second: Callable[[], float],
    ) -> None:
        """Read these gauges from the scheduler when scraped."""
        self.queue_depth.set_function(queued)
        self.running.set_function(running)
        self.tokens_per_second.set_function(tokens_per_second)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)  # the real one when ``port`` is 0
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
