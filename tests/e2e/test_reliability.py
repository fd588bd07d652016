"""Zero failed calls through overload and a rolling restart (the crashed worker is tests/e2e/test_workers.py's).

- 2,000 simultaneous calls against a queue of 64: every call gets OK or
  RESOURCE_EXHAUSTED (never CANCELLED: grpc core holds up to
  --max-pending-rpcs calls, and admission refuses before it would cancel), and
  the server's own metrics count exactly what the callers saw.
- A rolling restart of two servers behind the project's client (round robin
  over both addresses, its retries): SIGTERM one, start it again, then the
  other, under steady load: no call fails.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
from helpers import classify_loop, free_port, image_input, scrape, small_image, start_server, total

from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc


async def _burst(target: str, calls: int, channels: int = 8) -> Counter:
    """`calls` one-image Classify calls sent at once over `channels` connections; each outcome counted."""
    request = pb.ClassifyRequest(inputs=[image_input(small_image(128))])
    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [pb_grpc.ClassifierStub(channel) for channel in opened]
    for channel in opened:
        await channel.channel_ready()

    async def one(i: int) -> str:
        try:
            await stubs[i % channels].Classify(request, timeout=60)
            return "OK"
        except grpc.aio.AioRpcError as error:
            return error.code().name

    try:
        return Counter(await asyncio.gather(*(one(i) for i in range(calls))))
    finally:
        for channel in opened:
            await channel.close()


def test_two_thousand_simultaneous_calls_get_ok_or_resource_exhausted_counted_alike(server_factory, cnn_model_file):
    # the CNN: slower than the callers, so the queue fills
    server = server_factory(cnn_model_file, "--max-queue", "64", "--max-items-per-call", "64")
    before = scrape(server)
    seen = asyncio.run(_burst(server.target, 2000))
    print(f"\n2,000 simultaneous calls, --max-queue 64: {dict(seen)}")
    assert set(seen) <= {"OK", "RESOURCE_EXHAUSTED"}, seen
    assert seen["OK"] >= 64 and seen["RESOURCE_EXHAUSTED"] > 0, seen  # served what fits, refused the rest
    after = scrape(server)
    for code, count in seen.items():
        counted = total(after, "bitmoji_requests_total", method="Classify", code=code) - total(
            before, "bitmoji_requests_total", method="Classify", code=code
        )
        assert counted == count, (code, counted, count)
    refusals = sum(total(after, "bitmoji_refusals_total", reason=r) for r in ("queue_full", "concurrency"))
    refusals -= sum(total(before, "bitmoji_refusals_total", reason=r) for r in ("queue_full", "concurrency"))
    assert refusals == seen["RESOURCE_EXHAUSTED"]


def test_a_rolling_restart_behind_the_client_fails_no_call(mlp_model_file):
    ports = [free_port(), free_port()]
    flags = ("--host", "127.0.0.1", "--shutdown-delay-s", "0.3", "--grace-period-s", "10")
    servers = [start_server(mlp_model_file, *flags, "--port", str(port), metrics=False) for port in ports]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    image = small_image(128)
    stop, outcomes, failures = threading.Event(), Counter(), []

    load = (target, image, stop, outcomes, failures)
    callers = [
        threading.Thread(target=classify_loop, args=load, kwargs={"load_balancing": "round_robin"}, daemon=True)
        for _ in range(4)
    ]
    for caller in callers:
        caller.start()
    try:
        for i, port in enumerate(ports):
            served = outcomes["OK"]
            time.sleep(1.0)
            assert outcomes["OK"] > served, "no load before the restart"
            assert servers[i].stop() == 0, servers[i].output()
            assert "shutting down" not in "".join(failures)
            served = outcomes["OK"]
            time.sleep(0.5)
            assert outcomes["OK"] > served, "the other server did not carry the load"
            servers[i] = start_server(mlp_model_file, *flags, "--port", str(port), metrics=False)
        time.sleep(1.0)
    finally:
        stop.set()
        for caller in callers:
            caller.join(30)
        for server in servers:
            server.stop()
    print(f"\nrolling restart of two servers under 4 callers: {dict(outcomes)}, failures {len(failures)}")
    assert not failures, failures[:5]
    assert outcomes["OK"] > 100
