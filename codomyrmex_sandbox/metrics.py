"""Prometheus metrics, with the `prometheus-client` library: what `/metrics` serves over HTTP.

Counters and the duration histogram are fed by the audit trail (every call's end record goes
through `AuditLog`, so nothing is counted twice or missed); the gauges (queue depth, running
executions, warm sandboxes, open sessions) are read from the live objects at each scrape. Each
`Sandbox` has a registry of its own, so that several in one process never mix their numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from codomyrmex_sandbox.errors import (
    InvalidRequestError,
    LimitAboveCapError,
    PrincipalBusyError,
    ServerBusyError,
    SessionLimitError,
    SessionNotFoundError,
    ShuttingDownError,
    UnknownLanguageError,
)

PREFIX = "codomyrmex_sandbox"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

# Most specific first: the first class an error is an instance of names the reason.
_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (LimitAboveCapError, "limit_above_cap"),
    (UnknownLanguageError, "unknown_language"),
    (SessionNotFoundError, "session_not_found"),
    (InvalidRequestError, "invalid_request"),
    (PrincipalBusyError, "principal_busy"),
    (SessionLimitError, "session_limit"),
    (ShuttingDownError, "shutting_down"),
    (ServerBusyError, "busy"),
)


def reason_of(error: BaseException | None) -> str:
    """A refusal's reason label, by the error that refused the call."""
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return "other"


@dataclass(frozen=True)
class Snapshot:
    """The gauges' values at one scrape."""

    queue_depth: int
    running: int
    open_sessions: int
    warm: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (language, pool) -> idle sandboxes


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._executions = Counter(
            f"{PREFIX}_executions",
            "Executions that ended, by language and status (the result's, or cancelled / not_run).",
            ["language", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            f"{PREFIX}_execution_duration_seconds",
            "Wall-clock time of executions that ran, from the sandbox's start to its end.",
            ["language"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._refusals = Counter(
            f"{PREFIX}_refusals",
            "Calls refused before they ran, by reason (invalid arguments, busy, unauthorized, ...).",
            ["reason"],
            registry=self.registry,
        )

    def executed(self, language: str, status: str, seconds: float | None) -> None:
        self._executions.labels(language=language, status=status).inc()
        if seconds is not None:
            self._duration.labels(language=language).observe(seconds)

    def refused(self, reason: str) -> None:
        self._refusals.labels(reason=reason).inc()

    def watch(self, read: Callable[[], Snapshot]) -> None:
        """Report the gauges from ``read()`` at each scrape."""
        self.registry.register(_Gauges(read))

    def render(self) -> bytes:
        """The Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _Gauges(Collector):
    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return []  # collected at each scrape only: the values are live

    def collect(self) -> Iterator[Metric]:
        now = self._read()
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Calls waiting for an execution slot.", value=now.queue_depth)
        yield GaugeMetricFamily(f"{PREFIX}_running_executions", "Executions holding a slot now.", value=now.running)
        yield GaugeMetricFamily(f"{PREFIX}_open_sessions", "Sessions open now.", value=now.open_sessions)
        warm = GaugeMetricFamily(
            f"{PREFIX}_warm_sandboxes",
            "Sandboxes started ahead of demand and idle, by language and pool (executions, sessions).",
            labels=["language", "pool"],
        )
        for (language, pool), count in sorted(now.warm.items()):
            warm.add_metric([language, pool], count)
        yield warm
