"""GradientProbe latency for one image vs Classify's, on the same server, interleaved call by call.

One caller (concurrency 1), one real 128x128 PNG per call, BCE loss, no
parameter values and no saliency PNG (the default probe); the calls alternate
Classify / GradientProbe so both see the same machine load. Issue 4's target:
GradientProbe p50 <= 3x Classify p50.

    python -m bench.probe --model mlp --calls 200
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import (
    CLASSIFY,
    PROBE,
    classify_request,
    export_model,
    images_source,
    loadavg,
    machine,
    percentiles,
    progress,
    real_images,
    start_server,
    write_json,
)


def probe_request(image: bytes, *, values: bool = False, saliency: bool = False) -> bytes:
    from bitmoji.v1 import classifier_pb2 as pb

    return pb.GradientProbeRequest(
        inputs=[pb.Input(image=image)],
        targets=[1.0],
        loss=pb.LOSS_BCE,
        include_values=values,
        include_saliency_png=saliency,
    ).SerializeToString()


def measure(
    target: str,
    images: list[bytes],
    calls: int,
    warmup_calls: int = 10,
    max_seconds: float = 120.0,
    saliency: bool = False,
) -> dict:
    import grpc

    classify = [classify_request(b) for b in images]
    probe = [probe_request(b, saliency=saliency) for b in images]
    lat = {"classify": [], "probe": []}
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        methods = {"classify": (channel.unary_unary(CLASSIFY), classify), "probe": (channel.unary_unary(PROBE), probe)}
        deadline = time.monotonic() + max_seconds
        for i in range(warmup_calls + calls):
            if time.monotonic() > deadline:
                progress(f"probe: stopped after {max_seconds:g} s ({i} rounds)")
                break
            for name, (call, requests) in methods.items():
                start = time.perf_counter()
                call(requests[i % len(requests)], timeout=30)
                if i >= warmup_calls:
                    lat[name].append((time.perf_counter() - start) * 1000.0)
    c, p = percentiles(lat["classify"]), percentiles(lat["probe"])
    return {
        "calls": len(lat["probe"]),
        "classify_ms": c,
        "probe_ms": p,
        "p50_ratio": p["p50"] / c["p50"] if c["p50"] else None,
        "target_ratio": 3.0,
        "loadavg": loadavg(),
    }


def run(
    model: str = "mlp", calls: int = 200, data=None, server_args=(), server_cwd=None, saliency: bool = False
) -> dict:
    images = real_images(data, 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(export_model(model, tmp)) if model in ("mlp", "cnn") else model
        progress(f"probe: starting the server on {path}")
        with start_server(path, list(server_args), cwd=server_cwd, metrics=False) as server:
            progress(f"probe: {calls} Classify + {calls} GradientProbe calls, interleaved...")
            result = measure(server.target, images, calls, saliency=saliency)
    result.update(benchmark="probe", model=model, images=images_source(data), saliency_png=saliency)
    progress(
        f"  Classify p50 {result['classify_ms']['p50']:.2f} ms, GradientProbe p50 {result['probe_ms']['p50']:.2f} ms: "
        f"ratio {result['p50_ratio']:.2f} (target <= 3)"
    )
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="mlp", help="model file, or mlp/cnn to export an untrained one (default mlp)")
    p.add_argument("--calls", type=int, default=200, help="measured calls of each method (after 10 warm-up rounds)")
    p.add_argument("--data", default=None)
    p.add_argument("--saliency", action="store_true", help="also ask for the saliency PNG")
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--server-cwd", default=None)
    p.add_argument("--quick", action="store_true", help="--calls 20")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.calls = 20
    result = run(args.model, args.calls, args.data, args.server_arg, args.server_cwd, args.saliency)
    result["machine"] = machine()
    print(
        f"Classify p50 {result['classify_ms']['p50']:.2f} ms p99 {result['classify_ms']['p99']:.2f} ms; "
        f"GradientProbe p50 {result['probe_ms']['p50']:.2f} ms p99 {result['probe_ms']['p99']:.2f} ms; "
        f"p50 ratio {result['p50_ratio']:.2f} (target <= 3); loadavg {loadavg()}"
    )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
