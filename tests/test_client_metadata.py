"""What calls carry besides their request: request ids both ways, and the caller's OpenTelemetry trace context."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import grpc
import pytest
from helpers import serve_fakes as serve

from bitmoji.client import AsyncBitmojiClient, BitmojiClient, BitmojiError


@pytest.fixture
def fake():
    server, classifier = serve()
    yield server, classifier
    server.stop()


def test_a_request_id_is_sent_and_comes_back_on_errors(fake):
    server, classifier = fake
    with BitmojiClient(server.target, retries=0) as client:
        client.classify(b"png", request_id="req-1")
        assert classifier.metadata[-1]["x-request-id"] == "req-1"
        with pytest.raises(BitmojiError) as info:
            client.classify([b"png", b"bad"], request_id="req-2")
        assert info.value.request_id == "req-2" and info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(BitmojiError) as info:
            client.classify(b"bad")  # none sent: the server's own id, from its trailing metadata
        assert info.value.request_id == f"srv-{len(classifier.attempts)}"
        with pytest.raises(BitmojiError) as info:
            client.load_model("gan", request_id="req-3")
        assert info.value.request_id == "req-3" and info.value.code == grpc.StatusCode.NOT_FOUND


def test_every_retry_carries_the_same_request_id(fake):
    server, classifier = fake
    classifier.failures = 2
    with BitmojiClient(server.target, backoff=0.01) as client:
        client.classify(b"png", request_id="same")
    assert [m["x-request-id"] for m in classifier.metadata] == ["same"] * 3


def test_an_error_from_no_server_keeps_the_request_id_it_was_given():
    with BitmojiClient("127.0.0.1:1", retries=0, timeout=2) as client:
        with pytest.raises(BitmojiError) as info:
            client.classify(b"png", request_id="lost-1")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.request_id == "lost-1"


def test_bad_request_ids_are_refused_before_the_call(fake):
    server, classifier = fake
    with BitmojiClient(server.target) as client:
        for bad in ("", "two\nlines", "naïve"):
            with pytest.raises(ValueError, match="request_id must be non-empty printable ASCII"):
                client.classify(b"png", request_id=bad)
        with pytest.raises(TypeError, match="request_id must be a str"):
            client.classify(b"png", request_id=7)
    assert classifier.attempts == []


def test_async_client_sends_and_reads_request_ids(fake):
    server, classifier = fake

    async def main():
        async with AsyncBitmojiClient(server.target) as client:
            await client.classify(b"png", request_id="a-1")
            try:
                await client.classify(b"bad", request_id="a-2")
            except BitmojiError as error:
                return error

    error = asyncio.run(main())
    assert classifier.metadata[0]["x-request-id"] == "a-1" and error.request_id == "a-2"


def test_the_cli_prints_the_request_id_of_a_failed_call(fake, capsys, tmp_path):
    from bitmoji.client import cli

    server, classifier = fake
    classifier.failures, classifier.code = 1, grpc.StatusCode.INTERNAL
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    assert cli.main(["--target", server.target, "classify", str(image)]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"bitmoji-client: classify failed: INTERNAL: scripted failure 1 (target {server.target}, request id srv-1)\n"
    )


def test_without_opentelemetry_imported_nothing_is_imported_or_sent(fake):
    """In a fresh process that never imports OpenTelemetry (installed here or not): no import, no traceparent."""
    server, classifier = fake
    script = textwrap.dedent(
        f"""
        import sys
        from bitmoji.client import BitmojiClient
        with BitmojiClient({server.target!r}) as client:
            client.classify(b"png")
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("opentelemetry", "numpy", "torch", "PIL")))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert "traceparent" not in classifier.metadata[-1]


def test_the_current_trace_context_is_injected():
    pytest.importorskip("opentelemetry.propagate")
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    server, classifier = serve()
    span = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(span)))
    try:
        with BitmojiClient(server.target) as client:
            client.classify(b"png")
            client.list_models()

        async def main():
            async with AsyncBitmojiClient(server.target) as client:
                await client.model_info()

        asyncio.run(main())
    finally:
        context.detach(token)
        server.stop()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert classifier.metadata[0]["traceparent"] == traceparent
    assert classifier.repository.metadata[0]["traceparent"] == traceparent
    assert classifier.metadata[1]["traceparent"] == traceparent  # asyncio: the caller's context too
