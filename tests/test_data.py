"""Data loading: the shared preprocessing path and clear errors for bad data folders."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bitmoji.core import preprocess
from bitmoji.trainer.data import DataError, choose_positive_class, load_dataset


def png_bytes(size=(128, 128), mode="RGB", color=(200, 30, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 128).save(buffer, format=fmt)
    return buffer.getvalue()


def write_split(root, split, classes=("cat", "not_cat"), n=3, size=(128, 128)):
    rng = np.random.default_rng(0)
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_any_mode_becomes_rgb_128(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img = Image.new("RGB", (131, 97), (10, 200, 50)).convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    out = preprocess.load_image(buffer.getvalue())
    assert out.dtype == torch.uint8 and out.shape == (3, 128, 128)


def test_decode_matches_pillow_for_png():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    decoded = preprocess.decode_image(buffer.getvalue())
    assert torch.equal(decoded, torch.from_numpy(array).permute(2, 0, 1))
    assert decoded.is_contiguous()  # batches are stacked from these on the model thread: a strided stack is 17x slower


@pytest.mark.parametrize("size", [(128, 129), (129, 128), (300, 200), (64, 64), (37, 41)])
def test_resize_equals_torchvisions_resize(size):
    from torchvision.transforms.v2 import functional as F

    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(size)))
    expected = F.resize(image, [128, 128], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(preprocess.resize(image), expected)


def test_model_input_is_the_lectures_to_tensor():
    from torchvision import transforms

    img = Image.new("RGB", (128, 128), (255, 0, 128))
    expected = transforms.ToTensor()(img)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    got = preprocess.to_model_input(preprocess.load_image(buffer.getvalue()))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty image"),
        (b"this is not an image at all", "not an image"),
        (png_bytes()[:60], "corrupt or truncated|unreadable"),
    ],
)
def test_bad_image_bytes(data, message):
    with pytest.raises(preprocess.ImageError, match=message):
        preprocess.load_image(data)


def test_decompression_bomb_refused_before_decoding():
    bomb = png_bytes(size=(5000, 5000), mode="L")  # compresses to a few KB
    assert len(bomb) < 100_000
    with pytest.raises(preprocess.ImageError, match="too large"):
        preprocess.load_image(bomb, max_pixels=4000 * 4000)


def test_positive_class_choice():
    assert choose_positive_class(["not_tom", "tom"]) == "tom"
    assert choose_positive_class(["eva", "not_eva"]) == "eva"
    assert choose_positive_class(["cat", "dog"]) == "dog"
    with pytest.raises(DataError, match="not one of"):
        choose_positive_class(["cat", "dog"], "cow")


def test_loads_both_splits_and_resizes(tmp_path):
    write_split(tmp_path, "train", size=(128, 129))
    write_split(tmp_path, "valid", n=2)
    train, valid = load_dataset(tmp_path, progress=False)
    assert train.images.shape == (6, 3, 128, 128) and valid.images.shape == (4, 3, 128, 128)
    assert train.class_names == ["cat", "not_cat"] and train.positive_class == "cat"
    assert train.targets.tolist() == [1, 1, 1, 0, 0, 0]


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such data folder"):
        load_dataset(tmp_path / "nope")
    write_split(tmp_path, "train")
    with pytest.raises(DataError, match="valid: missing folder"):
        load_dataset(tmp_path)


def test_wrong_number_of_classes(tmp_path):
    write_split(tmp_path, "train", classes=("a", "b", "c"))
    write_split(tmp_path, "valid")
    with pytest.raises(DataError, match=r"exactly two class folders, found 3: \['a', 'b', 'c'\]"):
        load_dataset(tmp_path)


def test_classes_differ_between_splits(tmp_path):
    write_split(tmp_path, "train")
    write_split(tmp_path, "valid", classes=("cat", "dog"))
    with pytest.raises(DataError, match="train/ has classes"):
        load_dataset(tmp_path)


def test_empty_split(tmp_path):
    write_split(tmp_path, "train")
    (tmp_path / "valid" / "cat").mkdir(parents=True)
    (tmp_path / "valid" / "not_cat").mkdir(parents=True)
    with pytest.raises(DataError, match="empty class folder"):
        load_dataset(tmp_path)


def test_corrupt_image_is_named(tmp_path):
    write_split(tmp_path, "train")
    write_split(tmp_path, "valid")
    bad = tmp_path / "train" / "cat" / "broken.png"
    bad.write_bytes(png_bytes()[:80])
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(tmp_path, progress=False)
