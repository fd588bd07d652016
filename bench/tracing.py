"""What tracing costs: served img/s at 32 callers with tracing off, sampled at 100% and at 1%, side by side.

Each configuration is a fresh server (the MLP), with the standard OpenTelemetry
variables (OTEL_TRACES_EXPORTER=otlp, OTEL_TRACES_SAMPLER=parentbased_traceidratio,
OTEL_TRACES_SAMPLER_ARG) and a real OTLP exporter sending to a sink on
loopback that this script runs (a grpc TraceService that counts the spans it
receives and drops them), so the export's own cost is in the figure. The
configurations take turns, `--rounds` times, under the same generator; the
result is each one's img/s and its ratio to tracing off in the same round.

    python -m bench.tracing --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from concurrent import futures

from bench.common import (
    classify_request,
    export_model,
    loadavg,
    machine,
    progress,
    real_images,
    start_server,
    write_json,
)
from bench.load import auto_procs, run_level

CONFIGURATIONS = {
    "off": {},
    "100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    "1%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
}


class SpanSink:
    """An OTLP/gRPC trace receiver on loopback that counts spans and keeps nothing."""

    def __init__(self):
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.spans = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


def run(*, rounds: int = 3, concurrency: int = 32, duration: float = 5.0, warmup: float = 1.0, data=None) -> dict:
    sink = SpanSink()
    images = real_images(data, 8)
    requests = [classify_request(b) for b in images]
    rows: dict[str, list[dict]] = {name: [] for name in CONFIGURATIONS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = export_model("mlp", tmp)
            for r in range(rounds):
                for name, sampler in CONFIGURATIONS.items():
                    env = {"OTEL_TRACES_EXPORTER": "none"}
                    if sampler:
                        endpoint = f"http://127.0.0.1:{sink.port}"
                        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                               "OTEL_EXPORTER_OTLP_INSECURE": "true", **sampler}  # fmt: skip
                    progress(f"tracing: round {r + 1}/{rounds}, tracing {name}, {concurrency} callers...")
                    spans_before = sink.spans
                    with start_server(model, [], env=env) as server:
                        row = run_level(server.target, requests, concurrency, duration=duration, warmup=warmup,
                                        procs=auto_procs(concurrency), server_pids=[server.pid])  # fmt: skip
                    row["spans_exported"] = sink.spans - spans_before
                    rows[name].append(row)
                    progress(
                        f"  {row['images_per_s']:.0f} img/s, p50 {row['p50']:.2f} ms, {row['spans_exported']} spans"
                    )
    finally:
        sink.stop()
    summary = {}
    for name, runs in rows.items():
        ratios = [run["images_per_s"] / off["images_per_s"] for run, off in zip(runs, rows["off"], strict=True)]
        summary[name] = {
            "images_per_s": [round(run["images_per_s"], 1) for run in runs],
            "ratio_to_off": [round(x, 3) for x in ratios],
            "median_ratio": round(statistics.median(ratios), 3),
            "p50_ms": [round(run["p50"], 2) for run in runs],
            "errors": sum(run["error_count"] for run in runs),
            "spans_exported": sum(run["spans_exported"] for run in runs),
        }
    return {"benchmark": "tracing", "machine": machine(), "concurrency": concurrency, "duration_s": duration,
            "rounds": rounds, "summary": summary, "rows": rows, "loadavg_end": loadavg()}  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3, help="times each configuration runs, in turn (default 3)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent callers (default 32)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per run (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run (default 1)")
    p.add_argument("--data", default=None, help="real bitmoji folder (default ../shared/data/bitmoji)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    result = run(
        rounds=args.rounds, concurrency=args.concurrency, duration=args.duration, warmup=args.warmup, data=args.data
    )
    for name, s in result["summary"].items():
        print(f"tracing {name:>4}: {s['images_per_s']} img/s, ratio to off {s['ratio_to_off']} "
              f"(median {s['median_ratio']}), {s['spans_exported']} spans exported, {s['errors']} errors")  # fmt: skip
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
