"""The server's Prometheus metrics, in a registry of its own, served on their own HTTP port.

A dedicated `CollectorRegistry` (not prometheus-client's global one) keeps two
servers in one process, or a test, from sharing counters. Names follow the
Prometheus conventions: `bitmoji_` prefix, base units (seconds, bytes),
`_total` on counters, few labels. Every metric about a model carries `model`
and `version` labels, with values only for versions that were loaded (a name a
caller sends is never a label value unless it names a loaded model), and a
version's series are removed when it is unloaded.

Under `--workers N` (see `bitmoji.server.workers`) prometheus-client's
multiprocess mode keeps the values in files that the supervisor sums: gauges
say how (`livesum`: in-flight calls of all live workers), the model's identity
is a gauge set to 1 (an `Info` metric does not work across processes), and the
process metrics are kept per worker (see `ProcessMetrics`).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import resource
import time
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    values,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Latencies from 100 us to 10 s: the lonely-caller path is sub-millisecond, a big CNN batch is a second.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOGIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

# Why an accepted item never reached the model.
DROP_CANCELLED = "cancelled"
DROP_DEADLINE = "deadline"
DROP_FAILED = "failed"  # another item of the same call already failed
DROP_REASONS = (DROP_CANCELLED, DROP_DEADLINE, DROP_FAILED)

# Why a call was refused before it was served (each is also a bitmoji_requests_total code).
REFUSED_QUEUE = "queue_full"  # RESOURCE_EXHAUSTED: the version's batch queue has no room for the call's items
REFUSED_CONCURRENCY = "concurrency"  # RESOURCE_EXHAUSTED: --max-concurrent-rpcs calls are being handled
REFUSED_STARTING = "starting"  # UNAVAILABLE: the server is loading its models
REFUSED_SHUTDOWN = "shutdown"  # UNAVAILABLE: the server is draining
REFUSED_UNLOADING = "unloading"  # UNAVAILABLE: the version is being unloaded
REFUSED_REASONS = (REFUSED_QUEUE, REFUSED_CONCURRENCY, REFUSED_STARTING, REFUSED_SHUTDOWN, REFUSED_UNLOADING)

LOAD_OK, LOAD_FAILED = "ok", "failed"

# Why a call was not shadowed.
SHADOW_BUSY = "busy"  # the shadow's queue was over half full, or too many shadow runs were in flight
SHADOW_FAILED = "failed"  # the shadow run raised (the caller never sees it)


def multiprocess() -> bool:
    """True under `--workers N` (prometheus-client keeps values in PROMETHEUS_MULTIPROC_DIR files)."""
    return values.ValueClass is not values.MutexValue


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """Every metric the server exports; one instance per server."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        mv = ["model", "version"]
        self.requests = Counter(
            "bitmoji_requests",
            "RPCs finished, by method, gRPC status code name, and the model version that served them "
            "(empty when the call failed before one was chosen).",
            ["method", "code", "model", "version"],
            registry=r,
        )
        self.request_duration = Histogram(
            "bitmoji_request_duration_seconds",
            "Time from an RPC's start to its answer, by method and model version.",
            ["method", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "bitmoji_inflight_requests",
            "RPCs being handled now (health and reflection excluded).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.refusals = Counter(
            "bitmoji_refusals",
            "Calls refused before they were served, by reason: queue_full and concurrency (RESOURCE_EXHAUSTED), "
            "starting, shutdown and unloading (UNAVAILABLE).",
            ["reason"],
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "bitmoji_preprocess_duration_seconds",
            "Time to decode and preprocess one item (image decode + resize, or tensor checks).",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "bitmoji_queue_wait_seconds",
            "Time an item waited in its version's batch queue, from its call's arrival to its batch starting.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_duration = Histogram(
            "bitmoji_forward_duration_seconds",
            "Time of one batched forward pass, including the copies to and from the device.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bitmoji_batch_size", "Items in each executed model batch.", mv, buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "bitmoji_queue_depth",
            "Items accepted and not yet taken into a model batch.",
            mv,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.queue_capacity = Gauge(
            "bitmoji_queue_capacity",
            "Items a version's queue holds at most (--max-queue): depth / capacity is its saturation.",
            mv,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.items = Counter(
            "bitmoji_items", "Items run through the model by Classify, StreamClassify and ModelInfer.", mv, registry=r
        )
        self.items_dropped = Counter(
            "bitmoji_items_dropped",
            "Accepted items dropped before the model, by reason (cancelled, deadline, failed).",
            [*mv, "reason"],
            registry=r,
        )
        self.probes = Counter("bitmoji_probes", "GradientProbe computations run, by loss.", [*mv, "loss"], registry=r)
        self.model_info = Gauge(
            "bitmoji_model_info",
            "1 for each loaded model version: its file's build, the device and the architecture.",
            [*mv, "build", "device", "architecture"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_memory = Gauge(
            "bitmoji_model_memory_bytes",
            "Resident memory a loaded version added to the server process when it was loaded.",
            mv,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.model_versions = Gauge(
            "bitmoji_model_versions",
            "Versions of a model by state (UNAVAILABLE, LOADING, READY, UNLOADING, FAILED): a FAILED one never served.",
            ["model", "state"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_loads = Counter(
            "bitmoji_model_loads",
            "Model version loads and in-place reloads, by result (ok: serving; failed: refused, nothing replaced).",
            ["model", "result"],
            registry=r,
        )
        self.shadow_comparisons = Counter(
            "bitmoji_shadow_comparisons",
            "Items a shadow version ran beside the serving one (version), compared and never returned.",
            [*mv, "shadow_version"],
            registry=r,
        )
        self.shadow_disagreements = Counter(
            "bitmoji_shadow_disagreements",
            "Shadowed items whose predicted label differed between the serving version and the shadow.",
            [*mv, "shadow_version"],
            registry=r,
        )
        self.shadow_logit_difference = Histogram(
            "bitmoji_shadow_logit_difference",
            "|logit(serving version) - logit(shadow)| per shadowed item.",
            [*mv, "shadow_version"],
            buckets=LOGIT_BUCKETS,
            registry=r,
        )
        self.shadow_skipped = Counter(
            "bitmoji_shadow_skipped",
            "Calls not shadowed, by reason (busy: the shadow's queue was over half full; failed: it raised).",
            ["model", "reason"],
            registry=r,
        )
        self.serialization_duration = Histogram(
            "bitmoji_serialization_duration_seconds",
            "Protobuf parse of one request (direction=request) or serialisation of one response "
            "(direction=response), by method.",
            ["method", "direction"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.serving = Gauge(
            "bitmoji_serving",
            "1 while health says SERVING (0 while starting or draining; the minimum over workers).",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.torch_threads = Gauge(
            "bitmoji_torch_threads",
            "torch intra-op threads of the model (summed over the workers).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.build_info = Gauge(
            "bitmoji_build_info",
            "1, labelled with the versions of this server and of what it runs on.",
            ["version", "torch", "grpcio", "python"],
            multiprocess_mode="livemax",
            registry=r,
        )
        for reason in REFUSED_REASONS:
            self.refusals.labels(reason)  # export zeros, so rate() works from the start
        self.process = ProcessMetrics(r)

    def set_build_info(self, torch_version: str) -> None:
        import grpc

        self.build_info.labels(
            _version("bitmoji-serving"), torch_version, grpc.__version__, platform.python_version()
        ).set(1)

    def model_seen(self, model: str) -> None:
        """Export a model's load and shadow counters at 0 from the start, so increase() sees their first event."""
        for result in (LOAD_OK, LOAD_FAILED):
            self.model_loads.labels(model, result)
        for reason in (SHADOW_BUSY, SHADOW_FAILED):
            self.shadow_skipped.labels(model, reason)

    def shadow_pair(self, model: str, version: str, shadow_version: str) -> None:
        """Export a new shadow pairing's comparison counters at 0."""
        self.shadow_comparisons.labels(model, version, shadow_version)
        self.shadow_disagreements.labels(model, version, shadow_version)

    def version_metrics(self, model: str, version: str) -> VersionMetrics:
        """The per-version children a batcher and a probe observe (bound once: no label lookup per item)."""
        labels = (model, version)
        for reason in DROP_REASONS:
            self.items_dropped.labels(*labels, reason)
        return VersionMetrics(
            queue_wait=self.queue_wait.labels(*labels),
            preprocess=self.preprocess_duration.labels(*labels),
            forward=self.forward_duration.labels(*labels),
            batch_size=self.batch_size.labels(*labels),
            queue_depth=self.queue_depth.labels(*labels),
            items=self.items.labels(*labels),
            dropped={reason: self.items_dropped.labels(*labels, reason) for reason in DROP_REASONS},
        )

    def forget_version(self, model: str, version: str) -> None:
        """Remove an unloaded version's series (a cardinality bound: only loaded versions are exported).

        In multiprocess mode the value files keep them; gauges are zeroed instead.
        """
        if multiprocess():
            self.queue_depth.labels(model, version).set(0)
            self.queue_capacity.labels(model, version).set(0)
            self.model_memory.labels(model, version).set(0)
            return
        labelled = (
            self.preprocess_duration,
            self.queue_wait,
            self.forward_duration,
            self.batch_size,
            self.queue_depth,
            self.queue_capacity,
            self.items,
            self.model_memory,
        )
        for metric in labelled:
            _remove(metric, model, version)
        for reason in DROP_REASONS:
            _remove(self.items_dropped, model, version, reason)
        for metric in (self.requests, self.request_duration, self.probes, self.model_info):
            _remove_matching(metric, model=model, version=version)
        for metric in (self.shadow_comparisons, self.shadow_disagreements, self.shadow_logit_difference):
            _remove_matching(metric, model=model, version=version)
            _remove_matching(metric, model=model, shadow_version=version)

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP endpoint in a daemon thread; returns the server (call .shutdown())."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        return httpd


@dataclass(frozen=True)
class VersionMetrics:
    """One loaded version's metric children."""

    queue_wait: Histogram
    preprocess: Histogram
    forward: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    items: Counter
    dropped: dict[str, Counter]


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def _remove_matching(metric, **match: str) -> None:
    """Remove every child whose labels include `match` (prometheus-client has no remove-by-partial-labels)."""
    names = metric._labelnames
    with metric._lock:
        keys = [key for key in metric._metrics if all(key[names.index(k)] == v for k, v in match.items())]
    for key in keys:
        _remove(metric, *key)


class ProcessMetrics:
    """process_* and python_gc_* for this process.

    In one process, prometheus-client's own collectors (RSS, CPU seconds, open
    fds, start time; garbage collections). Under `--workers N` those collectors
    would describe only the supervisor, so each worker keeps the same figures
    as multiprocess gauges (mode `liveall`: one series per live worker, labelled `pid`),
    refreshed by `update()` every few seconds; the supervisor adds its own.
    """

    def __init__(self, registry: CollectorRegistry):
        self._gauges: dict[str, Gauge] = {}
        if not multiprocess():
            ProcessCollector(registry=registry)
            GCCollector(registry=registry)
            PlatformCollector(registry=registry)
            return
        for name, documentation in (
            ("process_resident_memory_bytes", "Resident memory size in bytes (per worker)."),
            ("process_cpu_seconds_total", "Total user and system CPU time spent in seconds (per worker)."),
            ("process_open_fds", "Number of open file descriptors (per worker)."),
            ("process_start_time_seconds", "Start time of the process since the epoch, in seconds (per worker)."),
            ("python_gc_collections_total", "Garbage collections run, all generations (per worker)."),
        ):
            # liveall: a dead worker's series go (its replacement's come), so sums per instance stay right
            self._gauges[name] = Gauge(name, documentation, multiprocess_mode="liveall", registry=registry)
        self._gauges["process_start_time_seconds"].set(_process_start_time())
        self.update()

    def update(self) -> None:
        if not self._gauges:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._gauges["process_cpu_seconds_total"].set(usage.ru_utime + usage.ru_stime)
        self._gauges["process_resident_memory_bytes"].set(rss_bytes())
        try:
            self._gauges["process_open_fds"].set(len(os.listdir("/proc/self/fd")))
        except OSError:
            pass
        self._gauges["python_gc_collections_total"].set(sum(s["collections"] for s in gc.get_stats()))


def _process_start_time() -> float:
    """When this process started, in seconds since the epoch (Linux: boot time + /proc/self/stat's start ticks)."""
    try:
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
