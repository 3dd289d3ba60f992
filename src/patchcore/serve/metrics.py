"""Prometheus text metrics of the service: requests, latency, batches, queue depth.

Label values come from a fixed set (route templates, status codes, served model names), so the
number of series stays bounded whatever clients send.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        """Prometheus lines of this histogram (`labels` is `key="v",` or empty)."""
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}le="{le}"}} {running}')
        inner = labels.rstrip(",")
        suffix = f"{{{inner}}}" if inner else ""
        out.append(f"{name}_sum{suffix} {self.total:.6f}")
        out.append(f"{name}_count{suffix} {self.n}")
        return out


def quote(value: str) -> str:
    """A label value escaped for the Prometheus text format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and histograms updated by the app and the batcher; `render` gives the text."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.images: dict[str, int] = defaultdict(int)
        self.rejected = 0
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        with self.lock:
            self.requests[(method, route, status)] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)
            if status == 503:
                self.rejected += 1

    def scored(self, model: str, n: int) -> None:
        """Count `n` images scored by `model`."""
        with self.lock:
            self.images[model] += n

    def batch(self, size: int, seconds: float) -> None:
        """Record one scored micro-batch."""
        with self.lock:
            self.batch_sizes.observe(size)
            self.batch_seconds.observe(seconds)

    def render(self, gauges: dict[str, tuple[str, float]],
               extra: Callable[[], list[str]] | None = None) -> str:
        """The Prometheus text exposition: counters, histograms, and `gauges` (name -> help,
        value) read at scrape time."""
        out: list[str] = []
        with self.lock:
            out += ["# HELP patchcore_requests_total HTTP requests by method, route and status.",
                    "# TYPE patchcore_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                out.append(f'patchcore_requests_total{{method="{method}",route="{quote(route)}",'
                           f'status="{status}"}} {n}')
            out += ["# HELP patchcore_request_seconds Request latency in seconds by route.",
                    "# TYPE patchcore_request_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                out += hist.lines("patchcore_request_seconds", f'route="{quote(route)}",')
            out += ["# HELP patchcore_images_scored_total Images scored, by model.",
                    "# TYPE patchcore_images_scored_total counter"]
            for model, n in sorted(self.images.items()):
                out.append(f'patchcore_images_scored_total{{model="{quote(model)}"}} {n}')
            out += ["# HELP patchcore_rejected_total Requests refused with 503 (queue full).",
                    "# TYPE patchcore_rejected_total counter",
                    f"patchcore_rejected_total {self.rejected}",
                    "# HELP patchcore_batch_images Images per scored micro-batch.",
                    "# TYPE patchcore_batch_images histogram",
                    *self.batch_sizes.lines("patchcore_batch_images", ""),
                    "# HELP patchcore_batch_seconds Scoring time of one micro-batch.",
                    "# TYPE patchcore_batch_seconds histogram",
                    *self.batch_seconds.lines("patchcore_batch_seconds", "")]
        for name, (help_text, value) in gauges.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        if extra is not None:
            out += extra()
        return "\n".join(out) + "\n"
