"""Limits the trainer and the server share. Torch-free: the `--workers` supervisor parses flags that use them."""

# Decompression-bomb guard: an image whose header says more pixels is refused before it is decoded.
DEFAULT_MAX_PIXELS = 4096 * 4096
