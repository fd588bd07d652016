"""Deterministic generator of the project's embedded default data set.

The real bitmoji data set (``tom`` vs ``not_tom``) cannot be shipped, so the
project embeds a synthetic stand-in with the same shape: a two-class image
data set in torchvision ``ImageFolder`` layout::

    OUT/train/eva/eva_00000.png       OUT/train/not_eva/not_eva_00000.png
    OUT/valid/eva/eva_00000.png       OUT/valid/not_eva/not_eva_00000.png

Every image is a 128x128 RGB cartoon avatar "sticker" drawn with Pillow.
Class ``eva`` is one recurring identity (face shape, skin, hairstyle and hair
colour, eye colour, glasses, earrings, freckles); class ``not_eva`` is a fresh
identity per image, and about half of those copy a few of eva's traits so
that no single attribute gives the answer away.

Why the images come in twins: like the real data set, which pairs every
``tom`` sticker with a ``not_tom`` sticker of the same scene, image ``i`` of
``eva`` and image ``i`` of ``not_eva`` share one :class:`Scene` (background,
pose, scale, position, caption, accents, clothes, expression).  Global cues
such as mean colour or layout therefore have the same distribution in both
classes, and only the local identity features (hair shape, glasses, eyes...)
at varying position and scale separate them: a small CNN learns that, a
flattened-pixel MLP mostly does not.

Determinism: all randomness comes from ``random.Random`` / numpy ``Generator``
instances seeded from ``seed`` and the split name, never from global state,
and PNGs are written without metadata, so the same seed gives byte-identical
files (with the same Pillow/zlib build).  The only font is Pillow's built-in
bitmap font, which does not depend on the FreeType version.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import random
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

__all__ = [
    "CLASSES",
    "EVA",
    "GENERATOR_VERSION",
    "Identity",
    "Scene",
    "generate",
    "render",
    "sample_negative",
    "sample_scene",
]

CLASSES = ("eva", "not_eva")  # positive class first
GENERATOR_VERSION = 1  # bump whenever the drawing code changes the pixels
MANIFEST_NAME = "synth.json"
SPLITS = ("train", "valid")

# Everything is drawn at this working resolution, then downsampled to `size`:
# the 2x supersampling gives cheap anti-aliasing to ImageDraw's hard edges.
CANVAS = 256
HEAD_CENTRE = (CANVAS // 2, 104)  # face centre on the upright avatar canvas

RGB = tuple[int, int, int]

# --------------------------------------------------------------------------- #
# Trait vocabularies
# --------------------------------------------------------------------------- #
FACE_SHAPES = ("round", "oval", "square", "long")
SKIN_TONES: tuple[RGB, ...] = (
    (255, 224, 196),
    (241, 194, 160),
    (224, 172, 128),
    (198, 140, 98),
    (168, 112, 74),
    (130, 86, 56),
    (96, 62, 42),
    (238, 206, 179),
)
HAIR_STYLES = (
    "bob_bangs",
    "long_straight",
    "short_side",
    "spiky",
    "curly",
    "bun",
    "ponytail",
    "buzz",
    "bald",
    "afro",
)
HAIR_COLOURS: tuple[RGB, ...] = (
    (30, 24, 22),
    (72, 44, 28),
    (122, 78, 44),
    (226, 190, 110),
    (150, 58, 30),
    (205, 98, 40),
    (170, 170, 176),
    (236, 120, 170),
    (60, 96, 200),
    (120, 70, 170),
)
EYE_COLOURS: tuple[RGB, ...] = (
    (96, 58, 30),
    (60, 120, 210),
    (50, 150, 70),
    (120, 120, 130),
    (150, 110, 50),
)
GLASSES_STYLES = ("none", "round", "square", "sunglasses")
FRAME_COLOURS: tuple[RGB, ...] = (
    (25, 25, 25),
    (200, 40, 40),
    (140, 80, 40),
    (40, 80, 200),
    (210, 170, 40),
)
EARRING_STYLES = ("none", "stud", "hoop")
EARRING_COLOURS: tuple[RGB, ...] = ((230, 190, 60), (200, 200, 210), (220, 60, 120))

EXPRESSIONS = ("smile", "grin", "open", "neutral", "surprised", "smirk")
CAPTIONS = (
    "HI!",
    "LOL",
    "OMG",
    "YAY",
    "NOPE",
    "OK",
    "WOW",
    "BRB",
    "HELLO",
    "THANKS",
    "SORRY",
    "NICE",
    "COOL",
    "LATER",
    "ZZZ",
    "UGH",
    "YES",
    "NO",
    "HAHA",
    "GG",
)
BACKGROUNDS = ("solid", "vertical", "diagonal", "radial", "dots", "stripes", "rays")
ACCENTS = ("heart", "star", "sparkle", "circle")
# Bright sticker palette shared by backgrounds, clothes, accents and captions.
PALETTE: tuple[RGB, ...] = (
    (255, 99, 132),
    (255, 159, 64),
    (255, 205, 86),
    (75, 192, 192),
    (54, 162, 235),
    (153, 102, 255),
    (201, 203, 207),
    (255, 255, 255),
    (40, 40, 60),
    (120, 220, 120),
    (250, 128, 114),
    (0, 150, 136),
    (233, 30, 99),
    (63, 81, 181),
    (139, 195, 74),
    (255, 235, 205),
)


@dataclasses.dataclass(frozen=True)
class Identity:
    """The traits that make a person recognisable across stickers."""

    face_shape: str
    skin: RGB
    hair_style: str
    hair_colour: RGB
    eye_colour: RGB
    glasses: str
    frame_colour: RGB
    earrings: str
    earring_colour: RGB
    freckles: bool
    beard: bool


# The positive class: auburn chin-length bob with bangs, green eyes, round
# tortoiseshell glasses, gold hoops, freckles.
EVA = Identity(
    face_shape="oval",
    skin=SKIN_TONES[1],
    hair_style="bob_bangs",
    hair_colour=HAIR_COLOURS[4],
    eye_colour=EYE_COLOURS[2],
    glasses="round",
    frame_colour=FRAME_COLOURS[2],
    earrings="hoop",
    earring_colour=EARRING_COLOURS[0],
    freckles=True,
    beard=False,
)

# Traits a negative may copy from eva, and the big visible ones of which a
# negative must differ in at least two; with at most four shared traits in
# all, every negative is clearly another person even at low resolution.
_SHAREABLE = (
    "face_shape",
    "skin",
    "hair_style",
    "hair_colour",
    "eye_colour",
    "glasses",
    "frame_colour",
    "earrings",
    "freckles",
)
_SALIENT = ("face_shape", "skin", "hair_style", "hair_colour", "glasses")
_MIN_SALIENT_DIFFERENCES = 2
_MAX_SHARED = 4


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything about a sticker except who is in it; shared by a twin pair."""

    background: str
    bg_colours: tuple[RGB, RGB]
    bg_angle: float
    dot_spacing: int  # only for the "dots" background
    dot_radius: int
    scale: float  # avatar size relative to the canvas
    head: tuple[float, float]  # where the face centre lands, in canvas fractions
    tilt: float  # head/body rotation in degrees
    mirrored: bool
    show_body: bool
    shirt_colour: RGB
    expression: str
    blush: bool
    lighting: tuple[int, int, int]  # small per-channel colour shift of skin/hair
    caption: str | None
    caption_colour: RGB
    caption_top: bool
    caption_scale: int
    accents: tuple[tuple[str, float, float, float, RGB], ...]  # kind, x, y, size, colour


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #
def _random_identity(rng: random.Random) -> Identity:
    return Identity(
        face_shape=rng.choice(FACE_SHAPES),
        skin=rng.choice(SKIN_TONES),
        hair_style=rng.choice(HAIR_STYLES),
        hair_colour=rng.choice(HAIR_COLOURS),
        eye_colour=rng.choice(EYE_COLOURS),
        glasses=rng.choice(GLASSES_STYLES),
        frame_colour=rng.choice(FRAME_COLOURS),
        earrings=rng.choice(EARRING_STYLES),
        earring_colour=rng.choice(EARRING_COLOURS),
        freckles=rng.random() < 0.3,
        beard=rng.random() < 0.15,
    )


def sample_negative(rng: random.Random) -> Identity:
    """A random non-eva identity; about half copy 1-3 of eva's traits."""
    while True:
        identity = _random_identity(rng)
        if rng.random() < 0.5:
            copied = rng.sample(_SHAREABLE, rng.randint(1, 3))
            identity = dataclasses.replace(identity, **{t: getattr(EVA, t) for t in copied})
        differences = sum(getattr(identity, t) != getattr(EVA, t) for t in _SALIENT)
        n_shared = sum(getattr(identity, t) == getattr(EVA, t) for t in _SHAREABLE)
        if differences >= _MIN_SALIENT_DIFFERENCES and n_shared <= _MAX_SHARED:
            return identity


def sample_scene(rng: random.Random) -> Scene:
    """Pose, framing and decoration, drawn independently of the identity."""
    bg_colours = (rng.choice(PALETTE), rng.choice(PALETTE))
    if rng.random() < 0.5:
        # Classic sticker portrait: big, centred, nearly upright.
        scale = rng.uniform(0.85, 1.0)
        head = (0.5 + rng.uniform(-0.03, 0.03), 0.42 + rng.uniform(-0.03, 0.03))
        tilt = rng.uniform(-6, 6)
    else:
        # Free framing: anywhere, any size, tilted; the face stays in frame.
        scale = rng.uniform(0.5, 1.0)
        reach = 0.28 * scale  # head radius (hair included) in canvas fractions
        head = (rng.uniform(reach, 1 - reach), rng.uniform(reach, 1 - reach - 0.02))
        tilt = rng.uniform(-20, 20)
    caption = rng.choice(CAPTIONS) if rng.random() < 0.5 else None
    accents = tuple(
        (rng.choice(ACCENTS), rng.random(), rng.random(), rng.uniform(0.04, 0.1), rng.choice(PALETTE))
        for _ in range(rng.randint(0, 4))
    )
    return Scene(
        background=rng.choice(BACKGROUNDS),
        bg_colours=bg_colours,
        bg_angle=rng.uniform(0, 2 * math.pi),
        dot_spacing=rng.randint(28, 48),
        dot_radius=rng.randint(4, 10),
        scale=scale,
        head=head,
        tilt=tilt,
        mirrored=rng.random() < 0.5,
        show_body=rng.random() < 0.8,
        shirt_colour=rng.choice(PALETTE),
        expression=rng.choice(EXPRESSIONS),
        blush=rng.random() < 0.4,
        lighting=(rng.randint(-12, 12), rng.randint(-12, 12), rng.randint(-12, 12)),
        caption=caption,
        caption_colour=rng.choice(PALETTE),
        caption_top=rng.random() < 0.5,
        caption_scale=rng.randint(2, 4),
        accents=accents,
    )


# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #
def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(max(0, min(255, round(c * factor))) for c in colour)  # type: ignore[return-value]


def _shift(colour: RGB, delta: tuple[int, int, int]) -> RGB:
    return tuple(max(0, min(255, c + d)) for c, d in zip(colour, delta, strict=True))  # type: ignore[return-value]


_GRID = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / (CANVAS - 1)  # (ys, xs) in [0, 1]


@functools.lru_cache(maxsize=2)
def _draw_background(scene: Scene) -> Image.Image:
    """Solid colour, gradient, or a simple pattern; cached so twins share one."""
    a = np.array(scene.bg_colours[0], dtype=np.float32)
    b = np.array(scene.bg_colours[1], dtype=np.float32)
    ys, xs = _GRID
    kind = scene.background
    if kind == "solid":
        t = np.zeros_like(xs)
    elif kind == "vertical":
        t = ys
    elif kind == "diagonal":
        t = (xs * math.cos(scene.bg_angle) + ys * math.sin(scene.bg_angle) + 1.5) % 1.0
    elif kind == "radial":
        t = np.clip(np.hypot(xs - 0.5, ys - 0.5) / 0.7071, 0, 1)
    elif kind == "stripes":
        proj = xs * math.cos(scene.bg_angle) + ys * math.sin(scene.bg_angle)
        t = (np.floor(proj * 8) % 2).astype(np.float32)
    elif kind == "rays":
        angle = np.arctan2(ys - 0.5, xs - 0.5) + scene.bg_angle
        t = (np.floor(angle / (2 * math.pi) * 16) % 2).astype(np.float32)
    else:  # dots: drawn below on a solid base
        t = np.zeros_like(xs)
    pixels = a + (b - a) * t[..., None]
    image = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    if kind == "dots":
        draw = ImageDraw.Draw(image)
        step, radius = scene.dot_spacing, scene.dot_radius
        for y in range(step // 2, CANVAS, step):
            shift = step // 2 if (y // step) % 2 else 0
            for x in range(shift, CANVAS + step, step):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=scene.bg_colours[1])
    return image


def _face_box(shape: str, cx: int, cy: int) -> tuple[int, int, int, int]:
    half_w, top, bottom = {"round": (50, 50, 54), "oval": (44, 56, 58), "square": (48, 52, 54), "long": (40, 60, 62)}[
        shape
    ]
    return cx - half_w, cy - top, cx + half_w, cy + bottom


def _draw_back_hair(draw: ImageDraw.ImageDraw, who: Identity, hair: RGB, box, cx: int, cy: int) -> None:
    """Hair that lies behind the head (long hair, bob, bun, afro, ponytail)."""
    x0, y0, x1, y1 = box
    style = who.hair_style
    if style == "bob_bangs":
        draw.ellipse((x0 - 14, y0 - 16, x1 + 14, y1 - 10), fill=hair)
        draw.rectangle((x0 - 14, cy, x1 + 14, cy + 48), fill=hair)
    elif style == "long_straight":
        draw.ellipse((x0 - 12, y0 - 14, x1 + 12, y0 + 90), fill=hair)
        draw.rectangle((x0 - 12, y0 + 40, x1 + 12, cy + 100), fill=hair)
    elif style == "ponytail":
        draw.ellipse((x1 - 6, cy - 36, x1 + 30, cy + 64), fill=hair)
    elif style == "bun":
        draw.ellipse((cx - 24, y0 - 40, cx + 24, y0 + 8), fill=hair)
    elif style == "afro":
        draw.ellipse((x0 - 34, y0 - 36, x1 + 34, y1 - 6), fill=hair)
    elif style == "curly":
        for k in range(14):
            angle = math.pi * (0.9 + 1.2 * k / 13)
            px, py = cx + 62 * math.cos(angle), cy - 6 + 66 * math.sin(angle)
            draw.ellipse((px - 18, py - 18, px + 18, py + 18), fill=hair)


def _draw_front_hair(draw: ImageDraw.ImageDraw, who: Identity, hair: RGB, box, cx: int, cy: int) -> None:
    """Hair over the scalp and forehead; its outline is the strongest identity cue."""
    x0, y0, x1, y1 = box
    style = who.hair_style
    if style == "bald":
        draw.ellipse((cx - 20, y0 + 6, cx - 4, y0 + 14), fill=(255, 255, 255))
        return
    if style == "buzz":
        draw.chord((x0 - 2, y0 - 4, x1 + 2, y0 + 50), 180, 360, fill=hair)
        return
    cap = (x0 - 5, y0 - 9, x1 + 5, y0 + 64)
    draw.chord(cap, 180, 360, fill=hair)
    if style == "bob_bangs":
        draw.rectangle((x0 + 4, y0 + 20, x1 - 4, cy - 22), fill=hair)  # straight fringe
        draw.rectangle((x0 - 8, y0 + 20, x0 + 8, cy + 40), fill=hair)  # side locks
        draw.rectangle((x1 - 8, y0 + 20, x1 + 8, cy + 40), fill=hair)
    elif style == "long_straight":
        draw.polygon(
            [(cx - 12, y0 - 4), (x0 - 6, y0 + 30), (x0 - 4, cy + 60), (x0 + 10, cy + 60), (x0 + 10, y0 + 40)], fill=hair
        )
        draw.polygon(
            [(cx - 12, y0 - 4), (x1 + 6, y0 + 30), (x1 + 4, cy + 60), (x1 - 10, cy + 60), (x1 - 12, y0 + 34)], fill=hair
        )
    elif style == "short_side":
        draw.polygon(
            [(x0 - 4, y0 + 34), (cx - 20, y0 - 4), (x1 + 6, y0 + 8), (x1 + 4, y0 + 36), (cx + 10, y0 + 22)], fill=hair
        )
    elif style == "spiky":
        for k in range(6):
            bx = x0 - 2 + k * (x1 - x0 + 4) / 6
            draw.polygon([(bx, y0 + 18), (bx + (x1 - x0) / 12, y0 - 30), (bx + (x1 - x0) / 6 + 2, y0 + 18)], fill=hair)
    elif style == "curly":
        for k in range(7):
            px = x0 + 6 + k * (x1 - x0 - 12) / 6
            draw.ellipse((px - 12, y0 + 6, px + 12, y0 + 30), fill=hair)
    elif style == "ponytail":
        draw.rectangle((x0, y0 + 20, x0 + 6, cy - 10), fill=hair)
        draw.rectangle((x1 - 6, y0 + 20, x1, cy - 10), fill=hair)
    elif style == "afro":
        draw.chord((x0 - 10, y0 - 16, x1 + 10, y0 + 56), 180, 360, fill=hair)


def _draw_eyes(draw: ImageDraw.ImageDraw, who: Identity, scene: Scene, hair: RGB, cx: int, cy: int) -> None:
    brow = _shade(hair, 0.7)
    raise_ = {"surprised": -5, "grin": -2}.get(scene.expression, 0)
    for side in (-1, 1):
        ex, ey = cx + side * 20, cy + 2
        draw.ellipse((ex - 10, ey - 7, ex + 10, ey + 7), fill=(255, 255, 255), outline=(40, 30, 30), width=2)
        draw.ellipse((ex - 6, ey - 6, ex + 6, ey + 6), fill=who.eye_colour)
        draw.ellipse((ex - 2, ey - 2, ex + 2, ey + 2), fill=(15, 15, 15))
        draw.ellipse((ex + 1, ey - 4, ex + 4, ey - 1), fill=(255, 255, 255))
        by = ey - 15 + raise_
        draw.line((ex - 10, by + 2, ex, by - 1, ex + 10, by + 2), fill=brow, width=4)


def _draw_glasses(draw: ImageDraw.ImageDraw, who: Identity, cx: int, cy: int) -> None:
    ey = cy + 2
    frame = who.frame_colour
    if who.glasses == "none":
        return
    for side in (-1, 1):
        ex = cx + side * 20
        if who.glasses == "round":
            draw.ellipse((ex - 15, ey - 15, ex + 15, ey + 15), outline=frame, width=4)
        elif who.glasses == "square":
            draw.rectangle((ex - 16, ey - 11, ex + 16, ey + 11), outline=frame, width=4)
        else:  # sunglasses hide the eyes entirely
            draw.rounded_rectangle(
                (ex - 17, ey - 11, ex + 17, ey + 12), radius=7, fill=(20, 20, 28), outline=frame, width=3
            )
    draw.line((cx - 6, ey - 2, cx + 6, ey - 2), fill=frame, width=3)


def _draw_mouth(draw: ImageDraw.ImageDraw, expression: str, skin: RGB, cx: int, cy: int) -> None:
    lip = (150, 40, 50)
    my = cy + 32
    if expression == "smile":
        draw.arc((cx - 16, my - 12, cx + 16, my + 8), 20, 160, fill=lip, width=4)
    elif expression == "grin":
        draw.chord((cx - 18, my - 12, cx + 18, my + 14), 0, 180, fill=(255, 255, 255), outline=lip, width=3)
    elif expression == "open":
        draw.chord((cx - 15, my - 10, cx + 15, my + 16), 0, 180, fill=(110, 20, 30))
        draw.chord((cx - 9, my + 2, cx + 9, my + 14), 180, 360, fill=(230, 100, 110))
    elif expression == "neutral":
        draw.line((cx - 11, my + 2, cx + 11, my + 2), fill=lip, width=4)
    elif expression == "surprised":
        draw.ellipse((cx - 7, my - 4, cx + 7, my + 12), fill=(110, 20, 30))
    else:  # smirk
        draw.line((cx - 12, my + 3, cx + 4, my + 3, cx + 13, my - 4), fill=lip, width=4)
    draw.arc((cx - 6, cy + 10, cx + 6, cy + 20), 20, 160, fill=_shade(skin, 0.7), width=3)  # nose


def _draw_avatar(who: Identity, scene: Scene) -> Image.Image:
    """The person on a transparent canvas, upright and centred; posed later."""
    avatar = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(avatar)
    skin = _shift(who.skin, scene.lighting)
    hair = _shift(who.hair_colour, scene.lighting)
    cx, cy = HEAD_CENTRE
    box = _face_box(who.face_shape, cx, cy)
    x0, y0, x1, y1 = box

    if scene.show_body:
        draw.ellipse((cx - 80, 180, cx + 80, 330), fill=scene.shirt_colour)
        draw.polygon([(cx - 16, 182), (cx + 16, 182), (cx, 204)], fill=skin)  # v-neck
        draw.rectangle((cx - 14, cy + 40, cx + 14, 186), fill=_shade(skin, 0.9))  # neck
    _draw_back_hair(draw, who, hair, box, cx, cy)
    for side in (-1, 1):  # ears
        ex = x0 if side < 0 else x1
        draw.ellipse((ex - 9, cy - 8, ex + 9, cy + 16), fill=skin)
        if who.earrings == "hoop":
            draw.ellipse((ex - 7, cy + 12, ex + 7, cy + 28), outline=who.earring_colour, width=3)
        elif who.earrings == "stud":
            draw.ellipse((ex - 4, cy + 12, ex + 4, cy + 20), fill=who.earring_colour)
    if who.face_shape == "square":
        draw.rounded_rectangle(box, radius=24, fill=skin)
    else:
        draw.ellipse(box, fill=skin)
    if who.beard:
        draw.chord((x0 + 2, cy - 10, x1 - 2, y1 + 6), 0, 180, fill=hair)
    if who.freckles:
        for side in (-1, 1):
            for fx, fy in ((10, 18), (17, 14), (24, 19), (15, 22)):
                px, py = cx + side * fx, cy + fy
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=_shade(skin, 0.72))
    if scene.blush:
        for side in (-1, 1):
            px = cx + side * 28
            draw.ellipse((px - 8, cy + 18, px + 8, cy + 26), fill=(240, 130, 140))
    _draw_front_hair(draw, who, hair, box, cx, cy)
    _draw_eyes(draw, who, scene, hair, cx, cy)
    _draw_glasses(draw, who, cx, cy)
    _draw_mouth(draw, scene.expression, skin, cx, cy)
    return avatar


def _star(cx: float, cy: float, outer: float, inner: float, points: int) -> list[tuple[float, float]]:
    return [
        (
            cx + (outer if k % 2 == 0 else inner) * math.sin(math.pi * k / points),
            cy - (outer if k % 2 == 0 else inner) * math.cos(math.pi * k / points),
        )
        for k in range(2 * points)
    ]


def _draw_accent(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, size: float, colour: RGB) -> None:
    cx, cy, r = x * CANVAS, y * CANVAS, size * CANVAS
    if kind == "heart":
        draw.ellipse((cx - r, cy - r * 0.7, cx, cy + r * 0.3), fill=colour)
        draw.ellipse((cx, cy - r * 0.7, cx + r, cy + r * 0.3), fill=colour)
        draw.polygon([(cx - r * 0.97, cy), (cx + r * 0.97, cy), (cx, cy + r * 1.1)], fill=colour)
    elif kind == "star":
        draw.polygon(_star(cx, cy, r, r * 0.45, 5), fill=colour)
    elif kind == "sparkle":
        draw.polygon(_star(cx, cy, r, r * 0.2, 4), fill=colour)
    else:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, round(r / 4)))


_FONT = ImageFont.load_default_imagefont()  # bitmap: identical on every FreeType build


def _draw_caption(image: Image.Image, scene: Scene) -> None:
    """A sticker word in block letters with a dark or light outline."""
    assert scene.caption is not None
    left, top, right, bottom = _FONT.getbbox(scene.caption)
    mask = Image.new("L", (right + 4, bottom + 4), 0)
    ImageDraw.Draw(mask).text((2 - left, 2 - top), scene.caption, fill=255, font=_FONT)
    outline_mask = mask.filter(ImageFilter.MaxFilter(3))  # dilate while still small: cheap
    factor = scene.caption_scale * CANVAS // 128
    mask, outline_mask = (
        m.resize((m.width * factor, m.height * factor), Image.Resampling.NEAREST) for m in (mask, outline_mask)
    )
    x = (CANVAS - mask.width) // 2
    y = 4 if scene.caption_top else CANVAS - mask.height - 4
    luminance = sum(w * c for w, c in zip((0.299, 0.587, 0.114), scene.caption_colour, strict=True))
    outline = (20, 20, 30) if luminance > 128 else (250, 250, 250)
    image.paste(outline, (x, y), outline_mask)
    image.paste(scene.caption_colour, (x, y), mask)


def render(who: Identity, scene: Scene, size: int = 128) -> Image.Image:
    """One sticker: background, posed avatar, accents, caption; `size` x `size` RGB."""
    image = _draw_background(scene).copy()
    avatar = _draw_avatar(who, scene)
    if scene.mirrored:
        avatar = avatar.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = max(1, round(CANVAS * scene.scale))
    avatar = avatar.resize((side, side), Image.Resampling.BILINEAR)  # shrink first: rotating is the costly step
    avatar = avatar.rotate(scene.tilt, resample=Image.Resampling.BILINEAR)
    # Place it so the (rotated) face centre lands on scene.head; PIL rotates counter-clockwise.
    above = (HEAD_CENTRE[1] / CANVAS - 0.5) * side  # face centre relative to avatar centre
    theta = math.radians(scene.tilt)
    centre_x = scene.head[0] * CANVAS - above * math.sin(theta)
    centre_y = scene.head[1] * CANVAS - above * math.cos(theta)
    px, py = round(centre_x - side / 2), round(centre_y - side / 2)
    image.paste(avatar, (px, py), avatar)
    draw = ImageDraw.Draw(image)
    for kind, x, y, accent_size, colour in scene.accents:
        _draw_accent(draw, kind, x, y, accent_size, colour)
    if scene.caption is not None:
        _draw_caption(image, scene)
    return image.resize((size, size), Image.Resampling.BOX)  # box = plain supersampling


# --------------------------------------------------------------------------- #
# Writing the data set
# --------------------------------------------------------------------------- #
def _manifest(n_train: int, n_valid: int, seed: int, size: int) -> dict:
    return {
        "generator": "trainer.synth",
        "version": GENERATOR_VERSION,
        "classes": list(CLASSES),
        "n_train": n_train,
        "n_valid": n_valid,
        "seed": seed,
        "size": size,
    }


def _expected_files(out: pathlib.Path, counts: dict[str, int]) -> list[pathlib.Path]:
    return [
        out / split / name / f"{name}_{i:05d}.png"
        for split in SPLITS
        for i in range(counts[split] // 2)
        for name in CLASSES
    ]


def _is_complete(out: pathlib.Path, manifest: dict, counts: dict[str, int]) -> bool:
    """True when out already holds exactly this data set (same parameters, all files)."""
    try:
        recorded = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if recorded != manifest:
        return False
    for split in SPLITS:
        for name in CLASSES:
            if len(list((out / split / name).glob("*.png"))) != counts[split] // 2:
                return False
    return all(path.is_file() for path in _expected_files(out, counts))


def generate(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 480,
    n_valid: int = 160,
    seed: int = 0,
    size: int = 128,
    progress: bool = True,
) -> pathlib.Path:
    """Write the data set; n_train/n_valid are per split totals, split evenly between the two classes.
    Returns out_dir. Deterministic: same seed -> byte-identical files.
    """
    if n_train < 2 or n_valid < 2 or n_train % 2 or n_valid % 2:
        raise ValueError(f"n_train and n_valid must be even and >= 2, got {n_train}, {n_valid}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    out = pathlib.Path(out_dir)
    counts = {"train": n_train, "valid": n_valid}
    manifest = _manifest(n_train, n_valid, seed, size)
    if _is_complete(out, manifest, counts):
        return out

    # Drop the manifest first so an interrupted run is never mistaken for complete.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
        for name in CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)

    bar = (
        tqdm(total=n_train + n_valid, desc="synth data set", unit="img", file=sys.stderr, disable=None)
        if progress
        else None
    )  # disable=None: terminals only
    for split in SPLITS:
        # Independent streams per split: valid scenes never replay train scenes.
        rng = random.Random(
            f"trainer.synth/{seed}/{split}"
        )  # the seed string predates the bitmoji namespace: keep it, keep the pixels
        for i in range(counts[split] // 2):
            scene = sample_scene(rng)
            twins = {"eva": EVA, "not_eva": sample_negative(rng)}
            for name in CLASSES:
                image = render(twins[name], scene, size)
                # No metadata, fixed compression: same pixels -> same bytes.
                image.save(out / split / name / f"{name}_{i:05d}.png", format="PNG", optimize=False, compress_level=6)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
        print(f"synth: wrote {n_train + n_valid} images to {out}", file=sys.stderr)  # for logs, where the bar is off
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out
