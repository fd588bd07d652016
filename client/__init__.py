"""Python client for the bitmoji classifier service.

    from client import BitmojiClient

    with BitmojiClient("127.0.0.1:50051") as bitmoji:
        for p in bitmoji.classify(["a.png", "b.jpg"]):
            print(p.label, p.probability)

`AsyncBitmojiClient` is the same for asyncio. Failed calls raise `BitmojiError`.
"""

from client.aio import AsyncBitmojiClient
from client.client import BitmojiClient
from client.errors import BitmojiError
from client.results import ModelInfo, ParameterGradient, Prediction, ProbeResult

__all__ = [
    "AsyncBitmojiClient",
    "BitmojiClient",
    "BitmojiError",
    "ModelInfo",
    "ParameterGradient",
    "Prediction",
    "ProbeResult",
]
