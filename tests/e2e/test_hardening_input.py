"""Hostile input over real gRPC: decompression bombs, unreadable formats, oversized messages, probe abuse,
and a property-based test that throws a thousand random, well-typed but hostile requests at one server.

What test_server.py already proves (corrupt/truncated/empty images, wrong tensor shape, dtype, byte
length, NaN, empty requests, too many items, the basic GradientProbe refusals) is not repeated here.
One MLP server serves the module, with small limits so that they are cheap to hit.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from helpers import health_status, image_input, png, rpc_error, rss_bytes, scrape, small_image, start_server, total
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bitmoji.client import BitmojiClient, BitmojiError
from bitmoji.client.channel import DEFAULT_MAX_MESSAGE_BYTES
from bitmoji.core.preprocess import DEFAULT_MAX_PIXELS, ImageError, load_image
from bitmoji.server.config import ServerConfig, parse_config
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_PIXELS = 20_000  # the module's server: a 128x128 image (16,384 pixels) passes, 200x200 does not
MAX_MESSAGE = 1024 * 1024
MAX_ITEMS = 16
# Every status a hostile but well-typed request may get (README, "Reliability and security").
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all zeros: tens of kilobytes that decode to width*height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hostile(mlp_model_file):
    server = start_server(
        mlp_model_file,
        "--max-image-pixels",
        str(MAX_PIXELS),
        "--max-message-bytes",
        str(MAX_MESSAGE),
        "--max-items-per-call",
        str(MAX_ITEMS),
        "--max-queue",
        "64",
        "--max-probe-inputs",
        "2",
        "--max-batch-size",
        "8",
    )
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="module")
def channel(hostile):
    with grpc.insecure_channel(hostile.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.ClassifierStub(channel)


def classify(*items: bytes) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(inputs=[image_input(b) for b in items])


# -- decompression bombs ------------------------------------------------------------


def test_a_decompression_bomb_is_refused_from_its_header_naming_the_item(hostile, stub, channel):
    bombs = {"20000x20000": png_bomb(20_000, 20_000), "6000x6000": png_bomb(6000, 6000)}
    assert all(len(b) < 100_000 for b in bombs.values())  # tiny on the wire, 400 M and 36 M pixels decoded
    before = rss_bytes(hostile.proc.pid)
    for _size, bomb in bombs.items():
        started = time.monotonic()
        error = rpc_error(stub.Classify, classify(small_image(), bomb), timeout=30)
        assert error.code() == INVALID and error.details().startswith("inputs[1]: image too large"), error.details()
        assert time.monotonic() - started < 5, "took as long as a full decode"
        assert "exceeds the limit of 20000" in error.details(), error.details()  # the server's limit, not Pillow's
    assert "6000x6000 pixels exceeds the limit of 20000" in error.details()
    grown = rss_bytes(hostile.proc.pid) - before
    assert grown < 40 * 1024 * 1024, f"server RSS grew {grown / 2**20:.0f} MiB: the bomb was decoded"
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_the_pixel_limit_is_the_configured_one(stub):
    assert len(stub.Classify(classify(small_image(128)), timeout=30).predictions) == 1  # 16,384 pixels
    error = rpc_error(stub.Classify, classify(small_image(128), small_image(200)), timeout=30)
    assert (
        error.code() == INVALID
        and "inputs[1]: image too large: 200x200 pixels exceeds the limit of 20000" in error.details()
    )
    # the flag and its environment variable; the default guards the trainer and the server alike
    assert parse_config(["--model", "m.pt", "--max-image-pixels", "100"], environ={}).max_image_pixels == 100
    assert parse_config(["--model", "m.pt"], environ={"BITMOJI_MAX_IMAGE_PIXELS": "7"}).max_image_pixels == 7
    assert ServerConfig(model="m.pt").max_image_pixels == DEFAULT_MAX_PIXELS
    with pytest.raises(ImageError, match="6000x6000 pixels exceeds the limit"):
        load_image(png_bomb(6000, 6000))


# -- formats Pillow cannot read, and files that are no images at all -----------------------


def _unreadable() -> dict[str, bytes]:
    pdf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(pdf, format="PDF")  # Pillow writes PDF but cannot read it
    svg = (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
        b'<rect width="8" height="8"/></svg>'
    )
    gz = zlib.compress(small_image(16))
    with open("/bin/sh", "rb") as f:
        elf = f.read(4096)
    return {
        "PDF": pdf.getvalue(),
        "SVG": svg,
        "zlib stream": gz,
        "ELF executable": elf,
        "PNG signature only": b"\x89PNG\r\n\x1a\n",
        "JSON": b'{"image": "cat.png"}',
        "NUL bytes": b"\x00" * 64,
    }


def test_formats_pillow_cannot_read_and_non_images_are_refused_naming_the_item(stub, channel):
    good = small_image(32)
    for what, data in _unreadable().items():
        error = rpc_error(stub.Classify, classify(good, good, data), timeout=30)
        assert error.code() == INVALID, f"{what}: {error.code()} {error.details()}"
        assert error.details() == "inputs[2]: not an image Pillow can read", f"{what}: {error.details()}"
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


# -- message size --------------------------------------------------------------------


def test_a_message_over_the_size_limit_is_resource_exhausted(hostile, stub, channel):
    big = small_image(32) + b"\x00" * MAX_MESSAGE  # the gRPC layer refuses it before any handler runs
    error = rpc_error(stub.Classify, classify(big), timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    with BitmojiClient(hostile.target, retries=3, timeout=30) as client:  # the client's default limit lets it send
        with pytest.raises(BitmojiError) as info:
            client.classify([big])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # and does not retry it
        assert len(client.classify([small_image(32)])) == 1
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_the_clients_default_message_limit_is_the_servers():
    assert (
        DEFAULT_MAX_MESSAGE_BYTES
        == ServerConfig(model="m.pt").max_message_bytes
        == parse_config(["--model", "m"], environ={}).max_message_bytes
    )


# -- GradientProbe abuse beyond test_server.py's ------------------------------------------


def test_gradient_probe_refuses_non_finite_and_mismatched_targets(stub):
    image = image_input(small_image(64))
    cases = {
        "NaN target": (pb.GradientProbeRequest(inputs=[image], targets=[float("nan")], loss=pb.LOSS_BCE), "finite"),
        "infinite mse target": (
            pb.GradientProbeRequest(inputs=[image], targets=[float("inf")], loss=pb.LOSS_MSE),
            "finite",
        ),
        "three targets for two inputs": (
            pb.GradientProbeRequest(inputs=[image, image], targets=[1, 0, 1]),
            "3 targets for 2 outputs",
        ),
        "no targets": (pb.GradientProbeRequest(inputs=[image]), "0 targets"),
        "negative loss enum": (pb.GradientProbeRequest(inputs=[image], targets=[1.0], loss=-3), "unknown loss -3"),
        "too many inputs": (pb.GradientProbeRequest(inputs=[image] * 3, targets=[1.0] * 3), "at most 2"),
        "a bomb": (
            pb.GradientProbeRequest(inputs=[image_input(png_bomb(6000, 6000))], targets=[1.0]),
            "inputs[0]: image too large",
        ),
    }
    for what, (request, message) in cases.items():
        error = rpc_error(stub.GradientProbe, request, timeout=30)
        assert error.code() == INVALID and message in error.details(), f"{what}: {error.code()} {error.details()}"


# -- the property-based test --------------------------------------------------------------

SHAPE = [3, 128, 128]
ITEM = 3 * 128 * 128
DTYPES = [0, 1, 2, 3, 4, 5, 99, -1]  # the four real ones, UNSPECIFIED, and values the enum does not have
ITEM_SIZE = {1: 4, 2: 8, 3: 2, 4: 1}


@st.composite
def tensors(draw) -> pb.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):  # the model's shape, right or wrong byte count, random or extreme values
        shape = SHAPE
        n = ITEM * ITEM_SIZE.get(dtype, 4) + draw(st.sampled_from([0, 0, 0, -1, 1, -4]))
        seed = draw(st.integers(0, 2**32 - 1))
        data = draw(st.sampled_from([b"\x00" * n, b"\xff" * n, np.random.default_rng(seed).bytes(n)])) if n > 0 else b""
    else:
        shape = draw(
            st.lists(st.one_of(st.integers(-2, 4), st.sampled_from([128, 2**31, 2**62, -(2**63)])), max_size=10)
        )
        data = draw(st.binary(max_size=64))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def image_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "signature", "image", "mutated", "crafted PNG", "bomb"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "signature":
        prefix = draw(
            st.sampled_from(
                [
                    b"\x89PNG\r\n\x1a\n",
                    b"\xff\xd8\xff\xe0",
                    b"GIF89a",
                    b"BM",
                    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
                    b"II*\x00",
                ]
            )
        )
        return prefix + draw(st.binary(max_size=128))
    if kind == "bomb":
        return _BOMB
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    mode = draw(st.sampled_from(["1", "L", "P", "RGB", "RGBA", "I;16", "CMYK", "LA"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"]))
    seed = draw(st.integers(0, 2**32 - 1))
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    try:
        out = io.BytesIO()
        Image.fromarray(array).convert(mode).save(out, format=fmt)
        data = out.getvalue()
    except (OSError, ValueError, KeyError):  # a mode the format cannot store
        data = png(array)
    if kind == "crafted PNG":  # damage behind valid chunk CRCs, as an attacker would: it reaches the decoder
        raw = bytearray(zlib.decompress(_png_chunk(png(array), b"IDAT")))
        stride = 1 + 3 * width  # an RGB row: its filter type byte, then the pixels
        damage = draw(st.sampled_from(["filter type", "short", "long", "pixels"]))
        if damage == "filter type":
            raw[stride * draw(st.integers(0, height - 1))] = draw(st.integers(5, 255))
        elif damage == "short":
            raw = raw[: draw(st.integers(0, len(raw) - 1))]
        elif damage == "long":
            raw += b"\x00" * draw(st.integers(1, 2 * stride))
        else:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return _with_idat(png(array), zlib.compress(bytes(raw)))
    if kind == "mutated" and data:
        cut = draw(st.integers(0, len(data)))
        flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=4))
        buf = bytearray(data)
        for at, value in flips:
            buf[at] = value
        data = bytes(buf[:cut] if draw(st.booleans()) else buf)
    return data


_BOMB = png_bomb(20_000, 20_000)


def _png_chunk(data: bytes, kind: bytes) -> bytes:
    """The body of the first `kind` chunk of a PNG written by Pillow (one IDAT for small images)."""
    pos = 8
    while pos < len(data):
        length, name = struct.unpack_from(">I4s", data, pos)
        if name == kind:
            return data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raise ValueError(kind)


def _with_idat(data: bytes, idat: bytes) -> bytes:
    """The PNG with its image data replaced, every CRC right."""
    old = _png_chunk(data, b"IDAT")
    start = data.index(b"IDAT") - 4
    chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return data[:start] + chunk + data[start + 12 + len(old) :]


inputs = st.one_of(
    st.builds(lambda b: pb.Input(image=b), image_bytes()),
    st.builds(lambda t: pb.Input(tensor=t), tensors()),
    st.just(pb.Input()),
)
targets = st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=4)
requests = st.one_of(
    st.builds(lambda xs: ("Classify", pb.ClassifyRequest(inputs=xs)), st.lists(inputs, max_size=MAX_ITEMS + 2)),
    st.builds(
        lambda xs, ts, loss, values, png_: (
            "GradientProbe",
            pb.GradientProbeRequest(inputs=xs, targets=ts, loss=loss, include_values=values, include_saliency_png=png_),
        ),
        st.lists(inputs, max_size=3),
        targets,
        st.sampled_from([-1, 0, 1, 2, 3, 1000]),
        st.booleans(),
        st.booleans(),
    ),
    st.builds(
        lambda xs: ("StreamClassify", [pb.ClassifyRequest(inputs=x) for x in xs]),
        st.lists(st.lists(inputs, max_size=3), min_size=1, max_size=3),
    ),
    st.just(("GetModelInfo", pb.GetModelInfoRequest())),
)


def test_a_thousand_hostile_requests_get_documented_statuses_and_the_server_survives(hostile, stub, channel):
    seen: dict[str, int] = {}

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(requests)
    def one(call):
        method, request = call
        try:
            if method == "StreamClassify":
                for _ in stub.StreamClassify(iter(request), timeout=30):
                    pass
            else:
                getattr(stub, method)(request, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            assert code in DOCUMENTED, f"{method}: {code} {error.details()}"
        seen[code.name] = seen.get(code.name, 0) + 1

    one()
    assert sum(seen.values()) >= 1000 and seen.get("OK") and seen.get("INVALID_ARGUMENT"), seen
    assert hostile.proc.poll() is None, hostile.output()
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert len(stub.Classify(classify(small_image(64)), timeout=30).predictions) == 1
    # the server's own count agrees: no status outside the set, nothing left queued, no unexpected error logged
    samples = scrape(hostile)
    counted = [dict(labels) for (name, labels), value in samples.items() if name == "bitmoji_requests_total" and value]
    # One exception: a stream message over the size limit ends the stream RESOURCE_EXHAUSTED (what the client
    # saw, checked above), but gRPC tells the handler only that it was cancelled.
    codes = {c["code"] for c in counted if (c["code"], c["method"]) != ("CANCELLED", "StreamClassify")}
    assert codes <= {c.name for c in DOCUMENTED}, counted
    assert total(samples, "bitmoji_queue_depth") == 0 and samples[("bitmoji_inflight_requests", ())] == 0
    log = hostile.output()
    assert "unexpected error" not in log and "Traceback" not in log and "Warning" not in log, (
        log
    )  # no log flooding either
