"""Faults an operator meets, run against real servers on loopback: how many calls fail through each.

    python -m bench.faults                      # every scenario
    python -m bench.faults --only overload,rolling --calls 5000

Scenarios (each starts its own servers on 127.0.0.1 and stops them; every
loop is bounded in count and time):
- overload: N simultaneous one-image calls (grpc.aio, 8 channels) against
  --max-queue 64 on the CNN: every call must end OK or RESOURCE_EXHAUSTED,
  and the server's own counts must match the callers';
- sigterm: 64 callers, SIGTERM mid-load: only OK and UNAVAILABLE, every call
  the server had accepted answered, exit 0;
- crashed-worker: --workers 2 under load through the project's client, one
  worker SIGKILLed, then SIGTERM while it restarts: no failed call, exit 0;
- rolling: two servers behind the client (round robin over both addresses),
  each SIGTERMed and started again in turn under load: no failed call;
- huge-image: a 60000x60000 PNG header: INVALID_ARGUMENT naming the server's
  --max-image-pixels limit, from the header.
Exit status 1 when any scenario saw a call end otherwise than promised.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

from bench.common import export_model, free_port, progress, real_images, start_server, write_json

SCENARIOS = ("overload", "sigterm", "crashed-worker", "rolling", "huge-image")


def _request(image: bytes):
    from bitmoji.v1 import classifier_pb2 as pb

    return pb.ClassifyRequest(inputs=[pb.Input(image=image)])


async def _burst(target: str, image: bytes, calls: int) -> Counter:
    import grpc

    from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(target) for _ in range(8)]
    stubs = [pb_grpc.ClassifierStub(c) for c in channels]
    request = _request(image)

    async def one(i: int) -> str:
        try:
            await stubs[i % 8].Classify(request, timeout=60)
            return "OK"
        except grpc.aio.AioRpcError as error:
            return error.code().name

    try:
        return Counter(await asyncio.gather(*(one(i) for i in range(calls))))
    finally:
        for channel in channels:
            await channel.close()


def _requests_counted(server) -> Counter:
    """The server's bitmoji_requests_total for Classify, by code (summed over model versions)."""
    from prometheus_client.parser import text_string_to_metric_families

    counted: Counter = Counter()
    for family in text_string_to_metric_families(server.metrics_text()):
        for sample in family.samples:
            if sample.name == "bitmoji_requests_total" and sample.labels.get("method") == "Classify":
                counted[sample.labels["code"]] += int(sample.value)
    return counted


def overload(models: dict, image: bytes, calls: int) -> dict:
    with start_server(models["cnn"], ["--max-queue", "64", "--max-items-per-call", "64"]) as server:
        seen = asyncio.run(_burst(server.target, image, calls))
        counted = _requests_counted(server)
    ok = set(seen) <= {"OK", "RESOURCE_EXHAUSTED"} and all(counted[code] == n for code, n in seen.items())
    return {"calls": calls, "seen": dict(seen), "server_counted": dict(counted), "as_promised": ok}


async def _callers(target: str, image: bytes, n: int, stop: asyncio.Event) -> Counter:
    import grpc

    from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

    seen: Counter = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        async def caller():
            while not stop.is_set():
                try:
                    await stub.Classify(_request(image), timeout=30)
                    seen["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    seen[error.code().name] += 1
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        return  # the server said it is going: this caller goes elsewhere

        await asyncio.gather(*(caller() for _ in range(n)))
    return seen


def sigterm(models: dict, image: bytes, callers: int = 64) -> dict:
    server = start_server(models["mlp"], ["--grace-period-s", "20"])

    async def run() -> Counter:
        stop = asyncio.Event()
        task = asyncio.ensure_future(_callers(server.target, image, callers, stop))
        await asyncio.sleep(2.0)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(3.0)
        stop.set()
        return await asyncio.wait_for(task, 60)

    seen = asyncio.run(run())
    code = server.proc.wait(30)
    line = next((line for line in server.log if "draining" in line), "")
    return {"callers": callers, "seen": dict(seen), "exit": code, "drain_line": line.strip(),
            "as_promised": set(seen) <= {"OK", "UNAVAILABLE"} and code == 0}  # fmt: skip


def _client_load(target: str, image: bytes, stop: threading.Event, seen: Counter, failures: list, **client) -> None:
    from bitmoji.client import BitmojiClient, BitmojiError

    with BitmojiClient(target, timeout=20, **client) as bitmoji:
        while not stop.is_set():
            try:
                bitmoji.classify([image])
                seen["OK"] += 1
            except BitmojiError as error:
                seen[error.code.name] += 1
                failures.append(f"{error.code.name}: {error.details}")


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def crashed_worker(models: dict, image: bytes) -> dict:
    server = start_server(models["mlp"], ["--workers", "2"], timeout=180)
    stop, seen, failures = threading.Event(), Counter(), []
    threads = [
        threading.Thread(target=_client_load, args=(server.target, image, stop, seen, failures)) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        ready = sum("ready on" in line for line in server.log)
        os.kill(_children(server.proc.pid)[0], signal.SIGKILL)  # under load
        deadline = time.monotonic() + 60
        while sum("ready on" in line for line in server.log) == ready and time.monotonic() < deadline:
            time.sleep(0.1)  # the other worker carries the load while the dead one is restarted
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    os.kill(_children(server.proc.pid)[0], signal.SIGKILL)
    time.sleep(0.3)  # SIGTERM mid-restart (the supervisor waits 1 s before starting the worker again)
    code = server.stop()
    return {"seen": dict(seen), "failures": failures[:5], "exit": code,
            "as_promised": not failures and code == 0}  # fmt: skip


def rolling(models: dict, image: bytes) -> dict:
    ports = [free_port(), free_port()]
    flags = ["--shutdown-delay-s", "0.3"]
    # a fixed port each: the last --port of a command line wins over start_server's --port 0
    servers = [start_server(models["mlp"], [*flags, "--port", str(p)]) for p in ports]
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    stop, seen, failures = threading.Event(), Counter(), []
    threads = [
        threading.Thread(
            target=_client_load, args=(target, image, stop, seen, failures), kwargs={"load_balancing": "round_robin"}
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    try:
        for i, port in enumerate(ports):
            time.sleep(1.5)
            servers[i].stop()
            servers[i] = start_server(models["mlp"], [*flags, "--port", str(port)])
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for server in servers:
            server.stop()
    return {"seen": dict(seen), "failures": failures[:5], "as_promised": not failures}


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its data is a few bytes: nothing to decode is sent)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def huge_image(models: dict, image: bytes) -> dict:
    import grpc

    from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

    with start_server(models["mlp"], []) as server, grpc.insecure_channel(server.target) as channel:
        try:
            pb_grpc.ClassifierStub(channel).Classify(_request(_png_header(60000, 60000)), timeout=30)
            return {"as_promised": False, "seen": "OK"}
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
    limit = "exceeds the limit of 16777216"  # --max-image-pixels' default
    return {
        "code": code.name,
        "details": details,
        "as_promised": code == grpc.StatusCode.INVALID_ARGUMENT and limit in details,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--calls", type=int, default=2000, help="simultaneous calls of the overload scenario (default 2000)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    image = real_images(None, 1)[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {arch: str(export_model(arch, tmp)) for arch in ("mlp", "cnn")}
        runs = {"overload": lambda: overload(models, image, args.calls), "sigterm": lambda: sigterm(models, image),
                "crashed-worker": lambda: crashed_worker(models, image), "rolling": lambda: rolling(models, image),
                "huge-image": lambda: huge_image(models, image)}  # fmt: skip
        for name in chosen:
            progress(f"faults: {name}...")
            results[name] = runs[name]()
            progress(f"  {'as promised' if results[name]['as_promised'] else 'NOT AS PROMISED'}: {results[name]}")
    write_json(args.json, results)
    return 0 if all(r["as_promised"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
