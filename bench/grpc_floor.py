"""The gRPC floor: the same load against a Classifier that does nothing, to show what gRPC itself costs.

A grpc.aio server whose Classify answers one fixed prediction per input
without decoding or running anything, loaded exactly like `bench.load` loads
the real server (same generator, same PNG requests). Its throughput is the
most one server process can give whatever the model; its CPU per call is the
part of the real server's CPU per image that no model or decoder change can remove.

    python -m bench.grpc_floor --concurrency 1,32,64 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

from bench.common import ROOT, classify_request, free_port, loadavg, machine, progress, real_images, write_json

LEVELS = (1, 32, 64)


async def _serve(port: int) -> None:
    import grpc

    from bitmoji.v1 import classifier_pb2 as pb
    from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

    class NoOp(pb_grpc.ClassifierServicer):
        async def Classify(self, request, context):
            return pb.ClassifyResponse(predictions=[pb.Prediction(label="x", probability=0.5) for _ in request.inputs])

        async def GetModelInfo(self, request, context):
            return pb.GetModelInfoResponse(architecture="no-op")

    server = grpc.aio.server()
    pb_grpc.add_ClassifierServicer_to_server(NoOp(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def run(levels=LEVELS, *, duration: float = 5.0, warmup: float = 1.0, data=None) -> dict:
    from bench import load

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_floor", "--serve", str(port)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the no-op server did not start")
        target = f"127.0.0.1:{port}"
        requests = [classify_request(b) for b in real_images(data, 8)]
        rows = []
        for c in levels:
            progress(f"grpc_floor: concurrency {c}, {warmup:g} s warm-up + {duration:g} s...")
            row = load.run_level(
                target, requests, c, duration=duration, warmup=warmup, procs=load.auto_procs(c), server_pids=[proc.pid]
            )
            progress(
                f"  {row['images_per_s']:.0f} calls/s, p50 {row['p50']:.2f} ms, "
                f"server {row['server_cpu_cores']:.2f} cores ({row['server_cpu_ms_per_image']:.3f} CPU ms/call)"
            )
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(10)
    return {"benchmark": "grpc_floor", "rows": rows, "loadavg": loadavg(), "machine": machine()}


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(
        prog="python -m bench.grpc_floor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", default=",".join(map(str, LEVELS)))
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--data", default=None, help="the real bitmoji set (for the request images)")
    p.add_argument("--json", default=None)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # internal: be the no-op server
    args = p.parse_args(argv)
    if args.serve is not None:
        asyncio.run(_serve(args.serve))
        return None
    started = time.perf_counter()
    result = run(
        [int(c) for c in args.concurrency.split(",")], duration=args.duration, warmup=args.warmup, data=args.data
    )
    print(f"{'conc':>5} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'srv cpu':>7} {'srv cpu ms/call':>15}")
    for r in result["rows"]:
        print(
            f"{r['concurrency']:>5} {r['images_per_s']:>8.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
            f"{r['server_cpu_cores']:>7.2f} {r['server_cpu_ms_per_image']:>15.3f}"
        )
    progress(f"grpc_floor: done in {time.perf_counter() - started:.0f} s")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
