"""The one preprocessing path shared by the trainer and the server.

An image (any format and mode Pillow reads) becomes a uint8 RGB tensor of shape
[3, 128, 128]; the model input is that divided by 255 (the lecture's
`Resize` + `ToTensor`). Keeping decode and resize as uint8 lets the trainer keep
a whole data set in memory cheaply and lets the server batch the float
conversion. torchvision.io decodes JPEG/WebP/GIF without holding the GIL
(imported on the first such image); Pillow decodes PNG (see below), is the
fallback for every other format and the guard against decompression bombs (it
reads only the header before we decide to decode). Resize is torch's
antialiased bilinear interpolation, the very function torchvision's `Resize`
runs on uint8 tensors.
"""

from __future__ import annotations

import functools
import io
import re
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from bitmoji.core.limits import DEFAULT_MAX_PIXELS

IMAGE_SIZE = (128, 128)  # (height, width)
CHANNELS = 3

# Recorded in the model file so a server knows how its inputs were made.
PREPROCESSING = {
    "decode": "rgb",  # any mode -> RGB, alpha dropped (Pillow's convert("RGB"))
    "resize": list(IMAGE_SIZE),
    "interpolation": "bilinear",
    "antialias": True,
    "dtype": "float32",
    "scale": 1 / 255,
    "layout": "NCHW",
}

# Not PNG: torchvision 0.29's decode_png turns every libpng error into a segmentation
# fault (its setjmp handler throws a C++ exception across libpng's C frames), so one
# corrupt PNG would kill the server or the trainer; about half of randomly mutated PNGs
# do (found by tests/test_hardening_input.py). Pillow's PNG decoder raises instead and
# also releases the GIL while it inflates. No crash was found in the others (1,500
# mutated JPEGs, GIFs and WebPs each).
_FAST_FORMATS = {"JPEG", "WEBP", "GIF"}

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns
# on every call. They are still the fastest GIL-free decoders we have; hide that
# one message, once, here (a filter per call would race between decode threads).
warnings.filterwarnings(
    "ignore",
    message=r"The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)


@functools.cache
def _torchvision_io():
    """torchvision's JPEG/WebP/GIF decoders, imported on the first such image: the import is 1.7-2 s
    (a third of the server's cold start) and holds the GIL, so a server fed PNGs never pays it."""
    from torchvision import io as tvio

    return tvio


class ImageError(ValueError):
    """The bytes are not an image we can use; the message says why."""


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open the image reading only its header: reject non-images and decompression bombs before decoding.

    The caller decodes from (and closes) the image this returns: parsing a PNG's chunks
    is Python work under the GIL, done once per image, not once to check and again to decode.
    """
    if not data:
        raise ImageError("empty image (0 bytes)")
    # No warnings.catch_warnings() here: it rewrites the process-wide filter list and is not
    # thread-safe (the server decodes on several threads). Our own pixel check below is the
    # guard; Pillow still raises DecompressionBombError past twice its own limit.
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses headers over twice its own limit before we see the size: say ours, not its
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1))} pixels" if found else "more pixels than Pillow allows"
        raise ImageError(f"image too large: {size} exceeds the limit of {max_pixels}") from None
    except Exception as exc:  # truncated headers raise many types
        raise ImageError(f"unreadable image header: {exc}") from None
    if width * height > max_pixels:
        problem = f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}"
    elif width == 0 or height == 0:
        problem = f"image has no pixels ({width}x{height})"
    else:
        return img
    img.close()
    raise ImageError(problem)


def _decode_with_pillow(img: Image.Image) -> torch.Tensor:
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # an RGB image needs no converted copy
    pixels = bytearray(rgb.tobytes())
    height, width = rgb.height, rgb.width
    # Contiguous CHW here, while the image is hot in cache: stacking 32 permuted HWC views into a
    # batch took 1.2 ms, 0.07 ms once they are contiguous; the copy costs 0.04 ms per image.
    return torch.frombuffer(pixels, dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1).contiguous()


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB tensor [3, H, W] at the image's own size."""
    with _open_checked(data, max_pixels) as img:
        fmt = img.format or "?"
        try:
            if fmt in _FAST_FORMATS:
                try:
                    tvio = _torchvision_io()
                    tensor = tvio.decode_image(
                        torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB
                    )
                    if tensor.dtype == torch.uint8 and tensor.dim() == 3 and tensor.shape[0] == 3:
                        return tensor
                except RuntimeError:
                    pass  # formats/variants torchvision's decoders refuse: let Pillow try
            return _decode_with_pillow(img)
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... on corrupt data
            raise ImageError(f"corrupt or truncated image ({fmt}): {exc}") from None


def resize(image: torch.Tensor, size: tuple[int, int] = IMAGE_SIZE) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, *size]; a no-op when the size already matches."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    # torchvision's F.resize does exactly this for uint8 CPU tensors (tests/test_data.py checks they
    # are equal); calling torch directly keeps torchvision off the path of PNGs of odd sizes.
    return torch.nn.functional.interpolate(
        image[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False
    )[0]


def load_image(
    data: bytes, *, size: tuple[int, int] = IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Encoded bytes -> uint8 [3, *size]: what the trainer stores and the server batches."""
    return resize(decode_image(data, max_pixels=max_pixels), size)


def load_image_file(path) -> torch.Tensor:
    """`ImageFolder` loader: a path -> uint8 [3, H, W] (resize is the transform's job)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_image(data)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 in [0, 1] (the lecture's `ToTensor`)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255.0)  # .to() copied: in place is safe
