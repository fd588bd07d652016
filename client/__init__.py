"""Python client for the bitmoji classifier service.

    from bitmoji.client import BitmojiClient

    with BitmojiClient("127.0.0.1:50051") as bitmoji:
        for p in bitmoji.classify(["a.png", "b.jpg"]):
            print(p.label, p.probability, p.model_name, p.model_version)

`AsyncBitmojiClient` is the same for asyncio. Failed calls raise `BitmojiError`.
The base install needs grpcio, grpcio-health-checking and protobuf only:
tensors come back as numpy arrays when numpy is installed, else as nested
lists (torch tensors when asked for), and numpy, torch and Pillow are only
imported to read objects of theirs that a caller passes in.

Retries (every RPC of the service is idempotent). gRPC retries, from the
channel's service config (`retry.py`), not a loop of ours:

- Retried: UNAVAILABLE (no connection, a server draining or restarting),
  RESOURCE_EXHAUSTED (the server's queue is full) and CANCELLED sent by a
  server (a stopping server cancels the calls it had read but not started;
  the caller's own cancellation is never retried), on Classifier,
  ModelRepository and health Check calls. Every other status is the
  server's answer and is raised at once (INVALID_ARGUMENT, NOT_FOUND,
  UNAUTHENTICATED, PERMISSION_DENIED, INTERNAL, DEADLINE_EXCEEDED, ...).
- How often: `retries` times after the first attempt (default 3; 0 to 4:
  gRPC makes at most 5 attempts a call).
- Backoff: retry n waits `backoff * 2**(n-1)` seconds +-20% (gRPC's jitter),
  after the failed attempt ended: by default 0.1, 0.2, 0.4 s.
- Deadline: each call has one (`timeout`, default 10 s) covering every
  attempt and wait; a call whose deadline passes, also while it waits for a
  retry, ends DEADLINE_EXCEEDED.
- Budget (gRPC's retryThrottling; one per client, shared by its calls): 10
  tokens; each failure with a retried status costs one, each success earns
  0.1; no retry while 5 or fewer are left, so retries <= 5 + successes / 10
  however many calls fail. A new client (retries=3) whose server always
  answers RESOURCE_EXHAUSTED makes 4 attempts on its first call and 1 on
  every later one (N calls: N + 3 attempts), until about 10 successes for
  each token lost let retries resume: retries cannot multiply an overload.
- A server's `grpc-retry-pushback-ms` trailing metadata overrides the wait
  (a negative value: no retry).
- Committed calls are not retried: once the server sent response headers or
  a message (a StreamClassify that got its first answer is not retried;
  one refused before its first answer is), or once a request exceeded the
  retry buffer (set to `max_message_bytes`, so none does).
- With nobody listening, each attempt fails at once (UNAVAILABLE) and these
  rules apply. With `load_balancing="round_robin"` a retry goes to the next
  address, so a server that stops or drains costs no failed call. A single
  server's restart outlasts the retries' waits (0.7 s by default):
  `wait_for_ready=True` makes calls wait for it (within their deadline)
  instead of failing UNAVAILABLE.
"""

from bitmoji.client.aio import AsyncBitmojiClient
from bitmoji.client.client import BitmojiClient
from bitmoji.client.errors import BitmojiError
from bitmoji.client.results import (
    ModelInfo,
    ModelList,
    ModelStatus,
    ModelVersionStatus,
    ParameterGradient,
    Prediction,
    ProbeResult,
)

__all__ = [
    "AsyncBitmojiClient",
    "BitmojiClient",
    "BitmojiError",
    "ModelInfo",
    "ModelList",
    "ModelStatus",
    "ModelVersionStatus",
    "ParameterGradient",
    "Prediction",
    "ProbeResult",
]
