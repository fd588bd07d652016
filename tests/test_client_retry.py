"""gRPC's retries as the client configures them, proven against real in-process grpc.aio servers that count
every attempt they receive: which codes are retried, how often, after what waits, within what deadline and
budget; streams, big requests, server push-back, round robin over two servers, a restart."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from helpers import FakeClassifier
from helpers import serve_fakes as serve

from bitmoji.client import AsyncBitmojiClient, BitmojiClient, BitmojiError

JITTER = 0.2  # gRPC core's, around backoff * 2**n
SLACK = 0.5  # seconds a loaded 2-core machine may add to a wait (the lower bounds are the sharp checks)


@pytest.fixture
def fake():
    server, classifier = serve()
    yield server, classifier
    server.stop()


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


RETRIED = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED]


@pytest.mark.parametrize("code", RETRIED)
def test_retried_codes_are_retried_after_exponential_waits(fake, code):
    server, classifier = fake
    classifier.failures, classifier.code = 3, code
    with BitmojiClient(server.target, retries=3, backoff=0.1) as client:
        (prediction,) = client.classify(b"png")
    assert prediction.label == "eva" and len(classifier.attempts) == 4  # 3 failures, then the answer
    for n, gap in enumerate(gaps(classifier.attempts)):
        wait = 0.1 * 2**n  # 0.1, 0.2, 0.4
        assert wait * (1 - JITTER) <= gap <= wait * (1 + JITTER) + SLACK, (n, gaps(classifier.attempts))


@pytest.mark.parametrize("code", RETRIED)
def test_retries_run_out_after_retries_plus_one_attempts(fake, code):
    server, classifier = fake
    classifier.failures, classifier.code = 100, code
    with BitmojiClient(server.target, retries=2, backoff=0.01) as client:
        with pytest.raises(BitmojiError) as info:
            client.classify(b"png")
    assert info.value.code == code and info.value.details == "scripted failure 3"  # the last attempt's answer
    assert len(classifier.attempts) == 3


def test_the_most_retries_are_four(fake):
    server, classifier = fake
    classifier.failures = 100
    with BitmojiClient(server.target, retries=4, backoff=0.01) as client:
        with pytest.raises(BitmojiError):
            client.classify(b"png")
    assert len(classifier.attempts) == 5


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
    ],
)
def test_other_codes_are_answers_and_not_retried(fake, code):
    server, classifier = fake
    classifier.failures, classifier.code = 1, code
    with BitmojiClient(server.target, retries=4, backoff=0.01) as client:
        with pytest.raises(BitmojiError) as info:
            client.classify(b"png")
    assert info.value.code == code and len(classifier.attempts) == 1


def test_retries_zero_makes_one_attempt(fake):
    server, classifier = fake
    classifier.failures = 1
    with BitmojiClient(server.target, retries=0) as client:
        with pytest.raises(BitmojiError):
            client.classify(b"png")
        assert len(client.classify(b"png")) == 1
    assert len(classifier.attempts) == 2


def test_the_deadline_covers_every_attempt_and_every_wait(fake):
    server, classifier = fake
    classifier.failures = 100
    with BitmojiClient(server.target, retries=4, backoff=0.2, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(BitmojiError) as info:
            client.classify(b"png")
        elapsed = time.monotonic() - start
    # attempts at 0 and ~0.2 s; the next would be at ~0.6 s, past the deadline, which ends the call
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(classifier.attempts) == 2 and elapsed < 0.5 + SLACK


def test_the_retry_budget_stops_retries_while_calls_keep_failing(fake):
    """10 tokens, -1 per failure with a retried code, +0.1 per success, retries only above 5 tokens."""
    server, classifier = fake
    classifier.failures, classifier.code = 10_000, grpc.StatusCode.RESOURCE_EXHAUSTED
    calls = 20
    with BitmojiClient(server.target, retries=3, backoff=0.01) as client:
        for _ in range(calls):
            with pytest.raises(BitmojiError):
                client.classify(b"png")
        # the first call: 4 attempts (10 -> 6 tokens); every later one: 1 (6 -> 5, then 0): N + 3 in all
        assert len(classifier.attempts) == calls + 3

        classifier.failures = 0  # the server recovers: 30 successes earn 3 tokens, not enough to retry again
        for _ in range(30):
            client.classify(b"png")
        classifier.attempts.clear()
        classifier.failures = 1
        with pytest.raises(BitmojiError):
            client.classify(b"png")  # 3 -> 2 tokens
        assert len(classifier.attempts) == 1

        classifier.failures = 0  # 45 more successes: 6.5 tokens, one retry is allowed again
        for _ in range(45):
            client.classify(b"png")
        classifier.attempts.clear()
        classifier.failures = 2
        with pytest.raises(BitmojiError):
            client.classify(b"png")
        assert len(classifier.attempts) == 2  # 6.5 -> 5.5: retry; 5.5 -> 4.5: stop

    classifier.attempts.clear()
    classifier.failures = 10_000
    with BitmojiClient(server.target, retries=3, backoff=0.01) as fresh:  # the budget belongs to a client
        with pytest.raises(BitmojiError):
            fresh.classify(b"png")
    assert len(classifier.attempts) == 4


def test_a_request_bigger_than_grpcs_default_retry_buffer_is_retried(fake):
    server, classifier = fake
    classifier.failures = 2
    with BitmojiClient(server.target, backoff=0.01) as client:
        assert len(client.classify([b"x" * 1_000_000, b"y" * 1_000_000])) == 2  # 2 MB: gRPC's buffer is 256 KiB
    assert len(classifier.attempts) == 3


def test_server_pushback_sets_the_wait_or_forbids_the_retry(fake):
    server, classifier = fake
    classifier.failures, classifier.pushback = 1, "400"
    with BitmojiClient(server.target, backoff=0.01) as client:
        client.classify(b"png")
        assert 0.4 <= gaps(classifier.attempts)[0] <= 0.4 + SLACK
        classifier.attempts.clear()
        classifier.failures, classifier.pushback = 1, "-1"
        with pytest.raises(BitmojiError):
            client.classify(b"png")
    assert len(classifier.attempts) == 1


def test_a_call_whose_response_headers_arrived_is_not_retried(fake):
    """What the server must do for retries to work: send no headers before a retryable failure."""
    server, classifier = fake
    classifier.failures, classifier.headers_first = 1, True
    with BitmojiClient(server.target, backoff=0.01) as client:
        with pytest.raises(BitmojiError) as info:
            client.classify(b"png")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and len(classifier.attempts) == 1


def test_a_stream_is_retried_until_its_first_answer_and_not_after(fake):
    server, classifier = fake
    classifier.failures = 1  # the first attempt fails before answering
    with BitmojiClient(server.target, backoff=0.01) as client:
        answers = list(client.classify_stream([[b"a"], [b"b", b"c"]]))
        assert [len(a) for a in answers] == [1, 2] and len(classifier.attempts) == 2

        classifier.attempts.clear()
        classifier.failures, classifier.stream_fail_after = 1, 1  # fails after its first answer
        stream = client.classify_stream([[b"a"], [b"b", b"c"]])
        assert len(next(stream)) == 1
        with pytest.raises(BitmojiError) as info:
            next(stream)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and len(classifier.attempts) == 1


def test_async_client_is_retried_the_same_way(fake):
    server, classifier = fake
    classifier.failures, classifier.code = 2, grpc.StatusCode.RESOURCE_EXHAUSTED

    async def main():
        async with AsyncBitmojiClient(server.target, backoff=0.01) as client:
            return await client.classify(b"png")

    assert len(asyncio.run(main())) == 1 and len(classifier.attempts) == 3


@pytest.mark.parametrize("grace", [1.0, None], ids=["drained", "stopped"])
def test_round_robin_spreads_calls_and_rides_over_a_stopped_server(grace):
    """Drained as the real server does on SIGTERM (GOAWAY, then the calls it took are answered), or stopped
    at once: calls in transit end UNAVAILABLE, those gRPC had read but not handed over end CANCELLED (both,
    measured), and are retried on the other server."""
    (one, first), (two, second) = serve(), serve()
    target = f"ipv4:127.0.0.1:{one.port},127.0.0.1:{two.port}"
    failures: list[BaseException] = []
    try:
        with BitmojiClient(target, load_balancing="round_robin") as client:
            client.wait_until_serving(10)
            for _ in range(20):
                client.classify(b"png")
            assert len(first.attempts) >= 5 and len(second.attempts) >= 5  # both served
            stop = threading.Event()

            def load():
                while not stop.is_set():
                    try:
                        client.classify(b"png")
                    except BaseException as error:  # noqa: BLE001 (every failure is counted)
                        failures.append(error)

            callers = [threading.Thread(target=load) for _ in range(4)]
            for caller in callers:
                caller.start()
            time.sleep(0.3)
            one.stop(grace)  # under load
            served = len(second.attempts)
            time.sleep(0.5)
            stop.set()
            for caller in callers:
                caller.join(10)
            assert len(second.attempts) > served + 10  # the survivor kept serving
            for _ in range(20):
                client.classify(b"png")
    finally:
        one.stop()
        two.stop()
    assert failures == []


def test_wait_for_ready_rides_through_a_restart():
    server, classifier = serve()
    port = server.port
    server.stop()
    restarted: list = []
    timer = threading.Timer(1.0, lambda: restarted.append(serve(FakeClassifier(), port=port)[0]))
    try:
        with BitmojiClient(f"127.0.0.1:{port}", retries=1, backoff=0.05, timeout=3) as impatient:
            with pytest.raises(BitmojiError) as info:  # fails fast: nobody listens
                impatient.classify(b"png")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with BitmojiClient(f"127.0.0.1:{port}", wait_for_ready=True, timeout=10) as patient:
            timer.start()
            start = time.monotonic()
            assert len(patient.classify(b"png")) == 1  # waits for the server instead
            assert time.monotonic() - start >= 0.9
            assert patient.health() == "SERVING"
    finally:
        timer.join()
        for again in restarted:
            again.stop()
