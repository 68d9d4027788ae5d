"""Prometheus metrics: what `/metrics` serves over HTTP, in the text format of `prometheus-client`.

Counters and the duration histogram are fed by the audit trail (every call's end record goes
through `AuditLog`, so nothing is counted twice or missed); the gauges (queue depth, running
executions, warm sandboxes, open sessions) are read from the live objects at each scrape. Each
`Sandbox` has metrics of its own, so that several in one process never mix their numbers.

The tallies are plain numbers kept here; `prometheus-client` is imported only when `render` is
first called, so that a stdio server, which never serves metrics, does not pay for its import at
start-up (most of an MCP server's time to its first answer is imports).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from prometheus_client.core import Metric

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
        self._lock = threading.Lock()
        self._executions: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._durations: dict[str, _Histogram] = {}
        self._refusals: defaultdict[str, int] = defaultdict(int)
        self._read: Callable[[], Snapshot] | None = None

    def executed(self, language: str, status: str, seconds: float | None) -> None:
        with self._lock:
            self._executions[language, status] += 1
            if seconds is not None:
                self._durations.setdefault(language, _Histogram()).observe(seconds)

    def refused(self, reason: str) -> None:
        with self._lock:
            self._refusals[reason] += 1

    def watch(self, read: Callable[[], Snapshot]) -> None:
        """Report the gauges from ``read()`` at each scrape."""
        self._read = read

    def render(self) -> bytes:
        """The Prometheus text format (`CONTENT_TYPE`)."""
        from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415 - see the docstring

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return bytes(generate_latest(registry))

    def families(self) -> Iterator[Metric]:
        from prometheus_client.core import (  # noqa: PLC0415 - see the docstring
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self._lock:
            executions = dict(self._executions)
            durations = {language: histogram.copy() for language, histogram in self._durations.items()}
            refusals = dict(self._refusals)
        counter = CounterMetricFamily(
            f"{PREFIX}_executions",
            "Executions that ended, by language and status (the result's, or cancelled / not_run).",
            labels=["language", "status"],
        )
        for (language, status), count in sorted(executions.items()):
            counter.add_metric([language, status], count)
        yield counter
        histogram = HistogramMetricFamily(
            f"{PREFIX}_execution_duration_seconds",
            "Wall-clock time of executions that ran, from the program's start to its end.",
            labels=["language"],
        )
        for language, tally in sorted(durations.items()):
            histogram.add_metric([language], buckets=tally.buckets(), sum_value=tally.total)
        yield histogram
        refused = CounterMetricFamily(
            f"{PREFIX}_refusals",
            "Calls refused before they ran, by reason (invalid arguments, busy, unauthorized, ...).",
            labels=["reason"],
        )
        for reason, count in sorted(refusals.items()):
            refused.add_metric([reason], count)
        yield refused
        if self._read is None:
            return
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


class _Histogram:
    """Counts per bucket (not cumulative), the total of the observations, and their number."""

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, value)] += 1
        self.total += value

    def copy(self) -> _Histogram:
        other = _Histogram()
        other.counts, other.total = list(self.counts), self.total
        return other

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, as the text format has them."""
        bounds = [*(repr(float(bound)) for bound in DURATION_BUCKETS), "+Inf"]
        running, cumulative = 0, []
        for bound, count in zip(bounds, self.counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        return cumulative


class _Collector:
    """The `prometheus-client` collector over one `Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()
