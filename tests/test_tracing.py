"""Tracing, request ids and JSON logs, on a real server run in this process (real gRPC on a loopback port).

Tracing is the OpenTelemetry SDK's, with its in-memory exporter: the RPC's
span continues the caller's `traceparent`, has queue/decode/forward children,
and calls that share a batch link to that batch's span. Off (no OTEL_*), the
serving path imports nothing of OpenTelemetry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers import ROOT, export_faulty_model, rows_request

from bitmoji.server import logs, tracing
from bitmoji.server.config import ServerConfig
from bitmoji.server.server import Server
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

MARKER = "PAYLOAD-MARKER-71c3"


class Running:
    """A Server started in a thread of its own (its own event loop); `stop()` drains and stops it.

    Without the Open Inference Protocol: its stubs and tritonclient's (tests/e2e/test_kserve.py) cannot share
    a process, and this test process may have imported tritonclient.
    """

    def __init__(self, config: ServerConfig):
        config = dataclasses.replace(config, open_inference_protocol=False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(config)
        self._run(self.server.start())
        self._run(self.server.warm())
        self.target = f"127.0.0.1:{self.server.port}"

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def stop(self) -> None:
        self._run(self.server.drain())
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    return export_faulty_model(tmp_path_factory.mktemp("models") / "faulty.pt", "faulty-1", classes=True)


@pytest.fixture(scope="module")
def traced(slow_model):
    """A server with tracing on (an in-memory exporter), one model thread, batches of up to 4."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    config = ServerConfig(
        model=str(slow_model), port=0, metrics_port=0, decode_workers=1, torch_threads=1, max_batch_size=4,
        max_batch_delay_ms=50, optimize="off",
    )  # fmt: skip
    running = Running(config)
    yield running, exporter
    running.stop()
    tracing.shutdown(provider)


def spans_of(exporter, trace_id: int) -> list:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def traceparent() -> tuple[int, int, str]:
    trace_id, span_id = uuid.uuid4().int >> 1, uuid.uuid4().int >> 65
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


def test_a_traced_call_continues_the_callers_trace_with_queue_decode_and_forward_children(traced):
    running, exporter = traced
    trace_id, parent_id, header = traceparent()
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        stub.Classify(rows_request([0.5, 0], [0.25, 0]), metadata=(("traceparent", header), ("x-request-id", "rid-1")))
    spans = spans_of(exporter, trace_id)
    (rpc,) = [s for s in spans if s.name == "bitmoji.v1.Classifier/Classify"]
    assert rpc.parent.span_id == parent_id and rpc.kind.name == "SERVER"
    attributes = dict(rpc.attributes)
    assert attributes["bitmoji.request_id"] == "rid-1" and attributes["rpc.grpc.status_code"] == "OK"
    assert (attributes["bitmoji.model"], attributes["bitmoji.model_version"], attributes["bitmoji.items"]) == (
        "bitmoji",
        "1",
        2,
    )
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == rpc.context.span_id}
    assert {"queue", "decode", "forward", "batch"} <= set(children), sorted(children)
    queue, decode, forward = children["queue"], children["decode"], children["forward"]
    assert rpc.start_time <= queue.start_time <= queue.end_time <= decode.start_time  # queued, then decoded...
    assert decode.end_time <= forward.start_time <= forward.end_time <= rpc.end_time  # ...then the forward pass
    assert dict(children["batch"].attributes)["bitmoji.batch_size"] == 2


def test_calls_that_share_a_batch_link_to_its_span(traced, slow_model):
    running, exporter = traced
    ids = [traceparent() for _ in range(2)]
    with grpc.insecure_channel(running.target) as channel, ThreadPoolExecutor(3) as pool:
        stub = pb_grpc.ClassifierStub(channel)
        blocker = pool.submit(stub.Classify, rows_request([1.0, 20000]), timeout=30)  # holds the one model thread
        while running.server.tracker.active < 1:
            pass
        calls = [
            pool.submit(
                stub.Classify, rows_request([0.1 * (i + 1), 0]), metadata=(("traceparent", header),), timeout=30
            )
            for i, (_, _, header) in enumerate(ids)
        ]
        blocker.result()
        assert [round(c.result().predictions[0].logit, 4) for c in calls] == [0.1, 0.2]
    forwards, rpcs = [], []
    for trace_id, _, _ in ids:
        spans = spans_of(exporter, trace_id)
        rpcs += [s for s in spans if s.name == "bitmoji.v1.Classifier/Classify"]
        forwards += [s for s in spans if s.name == "forward"]
    assert len(forwards) == 2 and len(rpcs) == 2
    (batch_a,), (batch_b,) = ([link.context.span_id for link in f.links] for f in forwards)
    assert batch_a == batch_b, "the two calls rode different batches"
    (batch,) = [s for s in exporter.get_finished_spans() if s.name == "batch" and s.context.span_id == batch_a]
    assert {link.context.span_id for link in batch.links} == {r.context.span_id for r in rpcs}
    assert dict(batch.attributes)["bitmoji.batch_size"] == 2


def test_without_otel_settings_the_serving_path_imports_no_opentelemetry(slow_model, tmp_path):
    """A server in a fresh interpreter, no OTEL_* set, serves a call; OpenTelemetry stays unimported."""
    code = f"""
import asyncio, os, sys, grpc
for key in [k for k in os.environ if k.startswith("OTEL_")]:
    del os.environ[key]
sys.path.insert(0, {str(ROOT / "tests")!r})
from helpers import rows_request
from bitmoji.server.config import ServerConfig
from bitmoji.server.server import Server
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

async def main():
    server = Server(ServerConfig(model={str(slow_model)!r}, port=0, metrics_port=0, optimize="off"))
    await server.start(); await server.warm()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{{server.port}}") as channel:
        await pb_grpc.ClassifierStub(channel).Classify(rows_request([0.5, 0]))
    await server.drain(); await server.stop()
asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_request_ids_are_echoed_or_generated_and_carried_by_json_log_lines(slow_model):
    stream = io.StringIO()
    log = logs.configure("DEBUG", "json")
    log.handlers[0].stream = stream
    config = ServerConfig(
        model=str(slow_model), port=0, metrics_port=0, decode_workers=1, optimize="off", auth_token="t0k"
    )
    running = Running(config)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            auth = ("authorization", "Bearer t0k")
            _, call = stub.Classify.with_call(rows_request([0.5, 0]), metadata=(auth, ("x-request-id", "mine-42")))
            assert dict(call.trailing_metadata())["x-request-id"] == "mine-42"  # echoed
            _, call = stub.Classify.with_call(rows_request([0.5, 0]), metadata=(auth,))
            generated = dict(call.trailing_metadata())["x-request-id"]
            assert len(generated) == 32 and int(generated, 16) >= 0  # a new one, when the caller sent none
            with pytest.raises(grpc.RpcError) as failed:  # the model raises: a log line about this call
                stub.Classify(rows_request([0.5, -1.0]), metadata=(auth, ("x-request-id", "bad-7")))
            assert dict(failed.value.trailing_metadata())["x-request-id"] == "bad-7"  # on failures too
            with pytest.raises(grpc.RpcError):  # refused before any handler: the id is still returned and logged
                stub.Classify(
                    rows_request([float(len(MARKER)), 0]),
                    metadata=(("authorization", f"Bearer {MARKER}"), ("x-request-id", "refused-9")),
                )
    finally:
        running.stop()
        logs.configure("INFO", "text")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all({"time", "level", "message"} <= set(line) for line in lines)
    failed_line = next(line for line in lines if "forward pass failed" in line["message"])
    assert failed_line["request_ids"] == ["bad-7"] and failed_line["level"] == "ERROR"
    refused_line = next(line for line in lines if "refused" in line["message"] and "refused-9" in line["message"])
    assert refused_line["level"] == "DEBUG"
    assert MARKER not in stream.getvalue()  # tokens (and payloads) never reach the log


def test_the_trace_id_reaches_json_log_lines_about_the_call(traced):
    running, _exporter = traced
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger(logs.LOGGER)
    log.addHandler(handler)
    trace_id, _, header = traceparent()
    try:
        with grpc.insecure_channel(running.target) as channel, pytest.raises(grpc.RpcError):
            pb_grpc.ClassifierStub(channel).Classify(rows_request([0.5, -1.0]), metadata=(("traceparent", header),))
    finally:
        log.removeHandler(handler)
    line = next(json.loads(line) for line in stream.getvalue().splitlines() if "forward pass failed" in line)
    assert len(line["request_ids"]) == 1 and line["trace_ids"] == [f"{trace_id:032x}"]
