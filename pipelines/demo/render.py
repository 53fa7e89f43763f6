"""Drawing the sample data's scenes: table textures, walls, plate, objects and the gripper.

The scene logic (episodes, planner, splits) lives in sample_data.py; this module only paints a
scene it is given, seen from above, into a PIL image at any size (geometry in fractions of it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from featurecache.errors import OptionError

if TYPE_CHECKING:
    from featurecache.pipelines.demo.sample_data import Episode, SceneObject

COLORS_RGB = {
    "red": (215, 40, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}

# Geometry as fractions of the image size.
_BAND = 0.16  # background band height
_MARGIN = 0.06  # table margin around the reachable area
_OBJECT_R = 0.075
_PLATE_R = 0.12


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) float32 noise in [0, 1], smooth at `cells` cells across."""
    small = rng.random((cells, cells), dtype=np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 20) -> np.ndarray:
    return np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255).astype(
        np.float32
    )


_PLAIN_RGB = {
    "plain-sand": (200, 180, 140),
    "plain-grey": (160, 160, 165),
    "plain-sage": (150, 170, 140),
}


def _texture(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 table surface."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    noise = _smooth_noise(rng, h, w, 8)[..., None]
    if name in _PLAIN_RGB:
        img = np.broadcast_to(_jitter(rng, _PLAIN_RGB[name]), (h, w, 3)) * (0.95 + 0.1 * noise)
    elif name == "wood":
        a, b = _jitter(rng, (150, 100, 60)), _jitter(rng, (110, 70, 40))
        t = 0.5 + 0.5 * np.sin((yy * rng.uniform(18, 30) + noise[..., 0] * 4) * math.pi)
        img = a * t[..., None] + b * (1 - t[..., None])
    elif name == "checker":
        a, b = _jitter(rng, (200, 200, 200)), _jitter(rng, (90, 90, 100))
        n = rng.uniform(4, 8)
        t = ((np.floor(xx * n) + np.floor(yy * n)) % 2)[..., None]
        img = a * t + b * (1 - t)
    elif name == "linen":
        a = _jitter(rng, (215, 205, 180))
        t = 0.9 + 0.1 * np.sin(xx * 160) * np.sin(yy * 160)
        img = a * t[..., None]
    elif name == "marble":
        a, b = _jitter(rng, (235, 235, 230)), _jitter(rng, (120, 120, 130))
        fine = _smooth_noise(rng, h, w, 24)
        t = np.abs(np.sin((xx + yy + 2 * fine) * math.pi * 3)) ** 0.3
        img = a * t[..., None] + b * (1 - t[..., None])
    elif name == "dots":
        a, b = _jitter(rng, (60, 120, 110)), _jitter(rng, (230, 230, 200))
        n = rng.uniform(8, 12)
        fx, fy = (xx * n) % 1 - 0.5, (yy * n) % 1 - 0.5
        t = ((fx**2 + fy**2) < 0.07)[..., None]
        img = b * t + a * (1 - t)
    elif name == "zigzag":
        a, b = _jitter(rng, (180, 60, 80)), _jitter(rng, (240, 220, 210))
        t = ((yy * 10 + np.abs((xx * 10) % 2 - 1)) % 1 < 0.5)[..., None]
        img = a * t + b * (1 - t)
    else:
        raise OptionError(f"Expected a texture name, got {name!r}.")
    img = img * (0.85 + 0.3 * noise)
    return np.clip(img, 0, 255).astype(np.uint8)


def _background(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 wall behind the table."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shade = (0.8 + 0.2 * yy / max(h - 1, 1))[..., None]
    if name == "grey-wall":
        img = _jitter(rng, (150, 150, 155)) * shade
    elif name == "beige-wall":
        img = _jitter(rng, (220, 200, 160)) * shade
    elif name == "blue-wall":
        img = _jitter(rng, (110, 150, 200)) * shade
    elif name == "brick":
        a, mortar = _jitter(rng, (160, 60, 45)), np.array([200, 195, 185], np.float32)
        bh = max(h / 3, 2.0)
        row = np.floor(yy / bh)
        bw = bh * 2.2
        offset = (row % 2) * bw / 2
        is_mortar = ((yy % bh) < 1) | (((xx + offset) % bw) < 1)
        img = np.where(is_mortar[..., None], mortar, a * shade)
    elif name == "curtain":
        a = _jitter(rng, (120, 30, 60))
        t = 0.7 + 0.3 * np.sin(xx / max(w, 1) * math.pi * 24)
        img = a * t[..., None]
    else:
        raise OptionError(f"Expected a background name, got {name!r}.")
    return np.clip(img, 0, 255).astype(np.uint8)


def image_fraction(xy: tuple[float, float] | np.ndarray) -> tuple[float, float]:
    """Table units -> (x, y) as fractions of the image's width and height (any image size; the
    geometry of `Canvas.px` without its pixel rounding of the wall band)."""
    m = _MARGIN
    return (m + float(xy[0]) * (1 - 2 * m), _BAND + m + float(xy[1]) * (1 - _BAND - 2 * m))


class Canvas:
    """Maps table units to pixels for one image size and draws scene parts."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.band = round(_BAND * size)
        self.margin = _MARGIN * size

    def px(self, xy: tuple[float, float] | np.ndarray) -> tuple[float, float]:
        s, m, b = self.size, self.margin, self.band
        return (m + float(xy[0]) * (s - 2 * m), b + m + float(xy[1]) * (s - b - 2 * m))

    def base(self, episode: Episode, rng: np.random.Generator) -> Image.Image:
        """The episode's still scene: wall, table, plate and the objects other than the target."""
        s, b = self.size, self.band
        img = np.empty((s, s, 3), np.uint8)
        img[:b] = _background(episode.background, rng, b, s)
        img[b:] = _texture(episode.texture, rng, s - b, s)
        image = Image.fromarray(img)
        draw = ImageDraw.Draw(image)
        cx, cy = self.px(episode.plate)
        r = _PLATE_R * s
        draw.ellipse(
            [cx - r, cy - r, cx + r, cy + r], fill=(245, 245, 240), outline=(150, 150, 150)
        )
        r2 = r * 0.65
        draw.ellipse([cx - r2, cy - r2, cx + r2, cy + r2], outline=(205, 205, 200))
        for obj in episode.objects[1:]:
            self.object(draw, obj, obj.xy, 1.0)
        return image

    def object(
        self, draw: ImageDraw.ImageDraw, obj: SceneObject, xy: np.ndarray | tuple, scale: float
    ) -> None:
        cx, cy = self.px(xy)
        r = _OBJECT_R * self.size * scale
        fill = COLORS_RGB[obj.color]
        dark = tuple(int(c * 0.55) for c in fill)
        if obj.shape == "sphere":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=dark)
            h = r * 0.35
            draw.ellipse(
                [cx - r * 0.5 - h, cy - r * 0.5 - h, cx - r * 0.5 + h, cy - r * 0.5 + h],
                fill=tuple(min(255, c + 90) for c in fill),
            )
            return
        if obj.shape == "cube":
            pts = [(r, r), (-r, r), (-r, -r), (r, -r)]
            pts = [(x * 0.85, y * 0.85) for x, y in pts]
        elif obj.shape == "triangle":
            pts = [
                (r * math.cos(a), r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
        elif obj.shape == "star":
            pts = [
                (
                    (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                    (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5),
                )
                for i in range(10)
            ]
        elif obj.shape == "cross":
            a, b = r, r * 0.35
            pts = [
                (b, a),
                (-b, a),
                (-b, b),
                (-a, b),
                (-a, -b),
                (-b, -b),
                (-b, -a),
                (b, -a),
                (b, -b),
                (a, -b),
                (a, b),
                (b, b),
            ]
        else:
            raise OptionError(f"Expected a shape name, got {obj.shape!r}.")
        draw.polygon(_rotate(pts, obj.yaw, cx, cy), fill=fill, outline=dark)

    def gripper(
        self, draw: ImageDraw.ImageDraw, xy: np.ndarray, z: float, yaw: float, closed: bool
    ) -> None:
        """The two-finger gripper at table `xy`, height `z` (its size), `yaw`, over its shadow."""
        cx, cy = self.px(xy)
        scale = 0.6 + 1.2 * z  # higher is bigger (closer to the camera): a salient cue
        r = _OBJECT_R * self.size
        sh = r * 0.5
        draw.ellipse([cx - sh, cy - sh * 0.6, cx + sh, cy + sh * 0.6], fill=(40, 40, 40))
        u = r * scale
        gap = (0.75 if closed else 1.35) * u
        finger_w, finger_l = 0.22 * u, 0.9 * u
        # closed fingers are drawn cyan: the gripper state is a salient cue, not a 3-px gap
        metal, edge = ((0, 225, 225), (0, 90, 90)) if closed else ((70, 72, 80), (20, 20, 25))
        bar = [
            (-gap - finger_w, -0.15 * u),
            (gap + finger_w, -0.15 * u),
            (gap + finger_w, 0.15 * u),
            (-gap - finger_w, 0.15 * u),
        ]
        draw.polygon(_rotate(bar, yaw, cx, cy), fill=metal, outline=edge)
        for sign in (-1, 1):
            x0 = sign * gap
            finger = [
                (x0 - finger_w, -finger_l),
                (x0 + finger_w, -finger_l),
                (x0 + finger_w, finger_l),
                (x0 - finger_w, finger_l),
            ]
            draw.polygon(_rotate(finger, yaw, cx, cy), fill=metal, outline=edge)


def _rotate(
    pts: list[tuple[float, float]], yaw: float, cx: float, cy: float
) -> list[tuple[float, float]]:
    c, s = math.cos(yaw), math.sin(yaw)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
