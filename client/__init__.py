"""Python client for the bitmoji classifier service.

    from bitmoji.client import BitmojiClient

    with BitmojiClient("127.0.0.1:50051") as bitmoji:
        for p in bitmoji.classify(["a.png", "b.jpg"]):
            print(p.label, p.probability)

`AsyncBitmojiClient` is the same for asyncio. Failed calls raise `BitmojiError`.
"""

from bitmoji.client.aio import AsyncBitmojiClient
from bitmoji.client.client import BitmojiClient
from bitmoji.client.errors import BitmojiError
from bitmoji.client.results import ModelInfo, ParameterGradient, Prediction, ProbeResult

__all__ = [
    "AsyncBitmojiClient",
    "BitmojiClient",
    "BitmojiError",
    "ModelInfo",
    "ParameterGradient",
    "Prediction",
    "ProbeResult",
]
