"""The server's Prometheus metrics, in a registry of its own, served on their own HTTP port.

A dedicated `CollectorRegistry` (not prometheus-client's global one) keeps two
servers in one process, or a test, from sharing counters. Names follow the
Prometheus conventions: `bitmoji_` prefix, base units (seconds), `_total` on
counters, few labels (method and status-code name; the drop reason).

Under `--workers N` (see `bitmoji.server.workers`) prometheus-client's multiprocess
mode keeps the values in files that the supervisor sums: gauges say how
(`livesum`: in-flight calls of all live workers), and the model's identity is
a gauge set to 1 (an `Info` metric does not work across processes).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, values

# Latencies from 100 us to 10 s: the lonely-caller path is sub-millisecond, a big CNN batch is a second.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Why an accepted item never reached the model.
DROP_CANCELLED = "cancelled"
DROP_DEADLINE = "deadline"
DROP_FAILED = "failed"  # another item of the same call already failed


class Metrics:
    """Every metric the server exports; one instance per server."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "bitmoji_requests", "RPCs finished, by method and gRPC status code name.", ["method", "code"], registry=r
        )
        self.request_duration = Histogram(
            "bitmoji_request_duration_seconds",
            "Time from an RPC's start to its answer, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "bitmoji_inflight_requests",
            "RPCs being handled now (health and reflection excluded).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "bitmoji_preprocess_duration_seconds",
            "Time to decode and preprocess one item (image decode + resize, or tensor checks).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "bitmoji_queue_wait_seconds",
            "Time an item waited in the batch queue, from its call's arrival to its batch starting (decode comes after).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_duration = Histogram(
            "bitmoji_forward_duration_seconds",
            "Time of one batched forward pass, including the copies to and from the device.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.serialization_duration = Histogram(
            "bitmoji_serialization_duration_seconds",
            "Protobuf parse of one request (direction=request) or serialisation of one response (direction=response), by method.",
            ["method", "direction"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bitmoji_batch_size", "Items in each executed model batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "bitmoji_queue_depth",
            "Items accepted and not yet taken into a model batch.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.items = Counter("bitmoji_items", "Items run through the model by Classify and StreamClassify.", registry=r)
        self.items_dropped = Counter(
            "bitmoji_items_dropped",
            "Accepted items dropped before the model, by reason (cancelled, deadline, failed).",
            ["reason"],
            registry=r,
        )
        self.probes = Counter("bitmoji_probes", "GradientProbe computations run, by loss.", ["loss"], registry=r)
        self.model_info = Gauge(
            "bitmoji_model_info",
            "The model being served: 1 for its version, device and architecture (0 for one replaced).",
            ["version", "device", "architecture"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self._model_labels: tuple[str, str, str] | None = None
        self.torch_threads = Gauge(
            "bitmoji_torch_threads",
            "torch intra-op threads of the model (summed over the workers).",
            multiprocess_mode="livesum",
            registry=r,
        )
        for reason in (DROP_CANCELLED, DROP_DEADLINE, DROP_FAILED):
            self.items_dropped.labels(reason)  # export zeros, so rate() works from the start

    def set_model(self, version: str, device: str, architecture: str) -> None:
        labels = (version, device, architecture)
        if self._model_labels is not None and self._model_labels != labels:
            if _multiprocess():
                self.model_info.labels(*self._model_labels).set(0)  # files keep a removed series: zero it
            else:
                self.model_info.remove(*self._model_labels)
        self.model_info.labels(*labels).set(1)
        self._model_labels = labels

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP endpoint in a daemon thread; returns the server (call .shutdown())."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        return httpd


def _multiprocess() -> bool:
    return values.ValueClass is not values.MutexValue
