"""Sample data: procedural, deterministic robot pick-and-place episodes as WebDataset shards.

The scene, seen from above: a background band (the wall) over a textured table, a plate (the
receptacle), three objects (a shape in a colour, e.g. "red cube") and a two-finger gripper whose
height shows as its size (bigger is higher) over its shadow on the table. The instruction names
one object: "put the red cube on the plate". A scripted planner moves the gripper to that object,
turns to its yaw, descends, closes, lifts it to the plate, lowers it, opens and retreats.

The action of a frame is the planner's command in the state the frame shows, so it is a function
of the image (gripper, object and plate positions, gripper state) and the instruction (which
object). 7-D like the paper's: (dx, dy, dz, droll, dpitch, dyaw, gripper), each in [-1, 1]:
dx, dy in units of MAX_XY of the table width, dz in units of MAX_Z, dyaw in units of MAX_YAW
(droll and dpitch are always 0: the gripper only yaws), gripper +1 = open, -1 = close.
LIVE_ACTION_DIMS are the five that move; losses and metrics of the demo use only those.
The cues the action depends on are drawn to be seen at 112 px: objects 17 px across, a gripper
whose size changes 3x with height, and fingers drawn cyan while closed.

Splits mirror the paper's OOD axes (PAPER.md):
- `train`: plain tables TRAIN_TEXTURES, backgrounds TRAIN_BACKGROUNDS, colours TRAIN_COLORS,
  shapes TRAIN_SHAPES, the named object on the left part of the table (x in TRAIN_TARGET_X).
- `ood-vision`: unseen textured tables and backgrounds, everything else as train.
- `ood-semantic`: the named object has an unseen colour and/or shape (OOD_COLORS, OOD_SHAPES);
  distractors stay in the train vocabulary.
- `ood-execution`: the named object lies in an unseen position range (x in OOD_TARGET_X).

Everything is seeded by (seed, split, episode), so an episode renders identically whatever the
frame count or shard size. Keys are `<split>-e<episode:05d>-s<step:03d>` (unique across splits,
no dots). Rendering is PIL + numpy, several hundred frames/s at 112-224 px.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from featurecache.errors import OptionError
from featurecache.store import local_path

__all__ = [
    "ACTION_DIM",
    "FRAMES_PER_EPISODE",
    "LIVE_ACTION_DIMS",
    "SPLITS",
    "Episode",
    "Frame",
    "make_episode",
    "render_episode",
    "scripted_action",
    "write_sample_data",
]

SPLITS: tuple[str, ...] = ("train", "ood-vision", "ood-semantic", "ood-execution")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
ACTION_DIM = 7
LIVE_ACTION_DIMS: tuple[int, ...] = (0, 1, 2, 5, 6)  # dx, dy, dz, dyaw, gripper
FRAMES_PER_EPISODE = 12  # a full pick-and-place takes 8-11 planner steps; the rest is retreat

TRAIN_COLORS = ("red", "green", "blue", "yellow")
OOD_COLORS = ("purple", "orange")
TRAIN_SHAPES = ("cube", "sphere", "triangle")
OOD_SHAPES = ("star", "cross")
# Train tables are plain (one colour, faint noise); the textured ones are unseen nuisances of
# ood-vision, as the paper's new table textures and backgrounds are.
TRAIN_TEXTURES = ("plain-sand", "plain-grey", "plain-sage")
OOD_TEXTURES = ("wood", "checker", "linen", "marble", "dots", "zigzag")
TRAIN_BACKGROUNDS = ("grey-wall", "beige-wall", "blue-wall")
OOD_BACKGROUNDS = ("brick", "curtain")
TRAIN_TARGET_X = (0.08, 0.62)  # table units: 0 = left edge, 1 = right edge
OOD_TARGET_X = (0.72, 0.92)

COLORS_RGB = {
    "red": (215, 40, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}

# Planner limits per step (the action's units) and heights (table units, z = 1 is the top).
MAX_XY = 0.25
MAX_Z = 0.5
MAX_YAW = math.pi / 8
HOVER_Z = 0.5
GRASP_Z = 0.05
PLACE_Z = 0.2
START_Z = 1.0
_TOL = 1e-6

# Geometry as fractions of the image size.
_BAND = 0.16  # background band height
_MARGIN = 0.06  # table margin around the reachable area
_OBJECT_R = 0.075
_PLATE_R = 0.12
_MIN_SEPARATION = 0.22  # between object/plate centres, table units

_SHARD_RE = re.compile(r"^frames-(\d{6})\.tar$")


@dataclass(frozen=True, slots=True)
class SceneObject:
    color: str
    shape: str
    xy: tuple[float, float]
    yaw: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True, slots=True)
class Episode:
    """The fixed scene of one episode: objects[0] is the named target."""

    split: str
    index: int
    texture: str
    background: str
    objects: tuple[SceneObject, ...]
    plate: tuple[float, float]
    start: tuple[float, float]
    instruction: str
    seed: int


@dataclass(slots=True)
class _State:
    xy: np.ndarray  # (2,) float64, table units
    z: float
    yaw: float
    held: bool = False
    released: bool = False
    target_xy: np.ndarray | None = None  # where the target object is now


@dataclass(frozen=True, slots=True)
class Frame:
    """One rendered frame: image (RGB), meta (the json), action float32 (7,)."""

    key: str
    image: Image.Image
    meta: dict
    action: np.ndarray


_TEMPLATES = (
    "put the {obj} on the plate",
    "place the {obj} on the plate",
    "move the {obj} onto the plate",
)


def make_episode(split: str, index: int, *, seed: int = 0) -> Episode:
    """The scene of episode `index` of `split` (deterministic in seed, split, index)."""
    if split not in _SPLIT_IDS:
        raise OptionError(f"Expected split in {SPLITS}, got {split!r}.")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    textures = OOD_TEXTURES if split == "ood-vision" else TRAIN_TEXTURES
    backgrounds = OOD_BACKGROUNDS if split == "ood-vision" else TRAIN_BACKGROUNDS
    texture = str(rng.choice(textures))
    background = str(rng.choice(backgrounds))

    if split == "ood-semantic":
        mode = int(rng.integers(3))  # 0: new colour, 1: new shape, 2: both
        color = str(rng.choice(OOD_COLORS if mode != 1 else TRAIN_COLORS))
        shape = str(rng.choice(OOD_SHAPES if mode != 0 else TRAIN_SHAPES))
    else:
        color, shape = str(rng.choice(TRAIN_COLORS)), str(rng.choice(TRAIN_SHAPES))
    # Distractors differ from the target in colour or shape (often just one of them), so the
    # instruction, not the scene, decides which object to pick.
    distractors: list[tuple[str, str]] = []
    while len(distractors) < 2:
        kind = int(rng.integers(3))
        c = color if kind == 0 and color in TRAIN_COLORS else str(rng.choice(TRAIN_COLORS))
        s = shape if kind == 1 and shape in TRAIN_SHAPES else str(rng.choice(TRAIN_SHAPES))
        if (c, s) != (color, shape) and (c, s) not in distractors:
            distractors.append((c, s))

    target_x = OOD_TARGET_X if split == "ood-execution" else TRAIN_TARGET_X
    ranges = [(target_x, (0.08, 0.92))] + [((0.08, 0.92), (0.08, 0.92))] * 3
    points = _place(rng, ranges)
    objects = []
    for (c, s), xy in zip([(color, shape), *distractors], points[:3], strict=True):
        yaw = 0.0 if s == "sphere" else float(rng.uniform(-math.pi / 4, math.pi / 4))
        objects.append(SceneObject(c, s, xy, yaw))
    start = (float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)))
    instruction = str(rng.choice(_TEMPLATES)).format(obj=objects[0].name)
    return Episode(
        split, index, texture, background, tuple(objects), points[3], start, instruction, seed
    )


def _place(
    rng: np.random.Generator, ranges: list[tuple[tuple[float, float], tuple[float, float]]]
) -> list[tuple[float, float]]:
    """Points in the given (x range, y range), pairwise at least _MIN_SEPARATION apart."""
    for _ in range(1000):
        points: list[tuple[float, float]] = []
        for xr, yr in ranges:
            for _ in range(200):
                p = (float(rng.uniform(*xr)), float(rng.uniform(*yr)))
                if all(math.dist(p, q) >= _MIN_SEPARATION for q in points):
                    points.append(p)
                    break
            else:
                break
        if len(points) == len(ranges):
            return points
    raise RuntimeError("could not place the scene objects")  # pragma: no cover


def scripted_action(
    state: _State, target: SceneObject, plate: tuple[float, float]
) -> tuple[np.ndarray, str]:
    """The planner's command in `state`: (action float32 (7,) in [-1, 1], phase name).

    Phases: reach (to above the target, turning to its yaw), descend, grasp (close), carry (to
    above the plate), lower, release (open), retreat (up). Each is decided by the state alone.
    """
    move = np.zeros(2)
    dz = dyaw = 0.0
    grip = 1.0
    if state.released:
        phase, dz = "retreat", START_Z - state.z
    elif not state.held:
        d = np.asarray(target.xy) - state.xy
        dyaw = _wrap(target.yaw - state.yaw)
        dist = float(np.linalg.norm(d))
        if dist > _TOL:
            phase, move, dz = "reach", d, HOVER_Z - state.z
        elif abs(dyaw) > _TOL:
            phase = "reach"  # turn in place until aligned
        elif state.z > GRASP_Z + _TOL:
            phase, dz = "descend", GRASP_Z - state.z
        else:
            phase, grip = "grasp", -1.0
    else:
        grip = -1.0
        d = np.asarray(plate) - state.xy
        if float(np.linalg.norm(d)) > _TOL:
            phase, move, dz = "carry", d, HOVER_Z - state.z
        elif state.z > PLACE_Z + _TOL:
            phase, dz = "lower", PLACE_Z - state.z
        else:
            phase, grip = "release", 1.0
    norm = float(np.linalg.norm(move))
    if norm > MAX_XY:
        move = move * (MAX_XY / norm)
    action = np.array(
        [
            move[0] / MAX_XY,
            move[1] / MAX_XY,
            np.clip(dz, -MAX_Z, MAX_Z) / MAX_Z,
            0.0,
            0.0,
            np.clip(dyaw, -MAX_YAW, MAX_YAW) / MAX_YAW,
            grip,
        ],
        dtype=np.float32,
    )
    return action, phase


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _apply(state: _State, action: np.ndarray, plate: tuple[float, float]) -> None:
    a = action.astype(np.float64)
    state.xy = state.xy + a[:2] * MAX_XY
    state.z = float(np.clip(state.z + a[2] * MAX_Z, 0.0, 1.0))
    state.yaw = state.yaw + a[5] * MAX_YAW
    if not state.held and not state.released and a[6] < 0:
        state.held = True
    elif state.held and a[6] > 0:
        state.held, state.released = False, True
        state.target_xy = np.asarray(plate, dtype=np.float64)
    if state.held:
        state.target_xy = state.xy.copy()


# ---------------------------------------------------------------- rendering


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


class _Canvas:
    """Maps table units to pixels for one image size and draws scene parts."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.band = round(_BAND * size)
        self.margin = _MARGIN * size

    def px(self, xy: tuple[float, float] | np.ndarray) -> tuple[float, float]:
        s, m, b = self.size, self.margin, self.band
        return (m + float(xy[0]) * (s - 2 * m), b + m + float(xy[1]) * (s - b - 2 * m))

    def base(self, episode: Episode) -> Image.Image:
        rng = np.random.default_rng([episode.seed, _SPLIT_IDS[episode.split], episode.index, 1])
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

    def gripper(self, draw: ImageDraw.ImageDraw, state: _State, closed: bool) -> None:
        cx, cy = self.px(state.xy)
        scale = 0.6 + 1.2 * state.z  # higher is bigger (closer to the camera): a salient cue
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
        draw.polygon(_rotate(bar, state.yaw, cx, cy), fill=metal, outline=edge)
        for sign in (-1, 1):
            x0 = sign * gap
            finger = [
                (x0 - finger_w, -finger_l),
                (x0 + finger_w, -finger_l),
                (x0 + finger_w, finger_l),
                (x0 - finger_w, finger_l),
            ]
            draw.polygon(_rotate(finger, state.yaw, cx, cy), fill=metal, outline=edge)


def _rotate(
    pts: list[tuple[float, float]], yaw: float, cx: float, cy: float
) -> list[tuple[float, float]]:
    c, s = math.cos(yaw), math.sin(yaw)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def render_episode(
    episode: Episode, *, image_size: int = 224, frames: int = FRAMES_PER_EPISODE
) -> Iterator[Frame]:
    """The first `frames` frames of an episode: the planner run from the start pose."""
    canvas = _Canvas(image_size)
    base = canvas.base(episode)
    target = episode.objects[0]
    state = _State(np.asarray(episode.start, np.float64), START_Z, 0.0)
    state.target_xy = np.asarray(target.xy, np.float64)
    info = {
        "instruction": episode.instruction,
        "episode": episode.index,
        "object": target.name,
        "color": target.color,
        "shape": target.shape,
        "texture": episode.texture,
        "background": episode.background,
        "split": episode.split,
    }
    for step in range(frames):
        action, phase = scripted_action(state, target, episode.plate)
        image = base.copy()
        draw = ImageDraw.Draw(image)
        lifted = state.held
        assert state.target_xy is not None
        if not lifted:
            canvas.object(draw, target, state.target_xy, 1.0)
        canvas.gripper(draw, state, closed=state.held)
        if lifted:  # held between the fingers, drawn above the table (bigger)
            canvas.object(draw, target, state.target_xy, 0.8 + 0.4 * state.z)
        key = f"{episode.split}-e{episode.index:05d}-s{step:03d}"
        meta = {
            **info,
            "step": step,
            "phase": phase,
            "positions": {
                "gripper": [round(float(v), 5) for v in (*state.xy, state.z, state.yaw)],
                "gripper_closed": bool(state.held),
                "target": [round(float(v), 5) for v in state.target_xy],
                "plate": [round(v, 5) for v in episode.plate],
                "objects": {
                    o.name: [round(o.xy[0], 5), round(o.xy[1], 5)] for o in episode.objects
                },
            },
        }
        yield Frame(key, image, meta, action)
        _apply(state, action, episode.plate)


def iter_frames(
    n: int,
    *,
    split: str = "train",
    seed: int = 0,
    image_size: int = 224,
    frames_per_episode: int = FRAMES_PER_EPISODE,
) -> Iterator[Frame]:
    """The first `n` frames of a split: episodes 0, 1, ... each giving `frames_per_episode`
    frames (a seeded subset of its steps when fewer than FRAMES_PER_EPISODE, see _kept_steps)."""
    episode = 0
    while n > 0:
        take = min(n, frames_per_episode)
        keep = _kept_steps(split, episode, seed, take)
        frames = render_episode(
            make_episode(split, episode, seed=seed), image_size=image_size, frames=max(keep) + 1
        )
        yield from (f for f in frames if f.meta["step"] in keep)
        n -= take
        episode += 1


def _kept_steps(split: str, episode: int, seed: int, take: int) -> set[int]:
    """The planner steps an episode contributes: all of the first `take` when that covers a whole
    episode, else `take` of its FRAMES_PER_EPISODE steps drawn at random (seeded), so that many
    short episodes still show every phase (reach ... release, retreat)."""
    if take >= FRAMES_PER_EPISODE:
        return set(range(take))
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], episode, 2])
    return {int(i) for i in rng.choice(FRAMES_PER_EPISODE, size=take, replace=False)}


def encode_sample(frame: Frame, image_format: str = "png") -> list[tuple[str, bytes]]:
    """The tar members of a frame sample: (name, bytes) for the image, json and action.npy."""
    buf = io.BytesIO()
    if image_format == "png":
        frame.image.save(buf, format="PNG", compress_level=1)
    elif image_format == "jpg":
        frame.image.save(buf, format="JPEG", quality=95)
    else:
        raise OptionError(f"Expected image_format 'png' or 'jpg', got {image_format!r}.")
    npy = io.BytesIO()
    np.save(npy, frame.action.astype(np.float32), allow_pickle=False)
    return [
        (f"{frame.key}.{image_format}", buf.getvalue()),
        (f"{frame.key}.json", json.dumps(frame.meta, sort_keys=True).encode()),
        (f"{frame.key}.action.npy", npy.getvalue()),
    ]


def write_tar(path: str | Path, members: list[tuple[str, bytes]]) -> None:
    """Write a deterministic tar (mtime 0, uid/gid 0) atomically (temp file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def write_sample_data(
    out: str | Path,
    *,
    frames: int,
    shard_size: int,
    image_size: int = 224,
    seed: int = 0,
    split: str = "train",
    frames_per_episode: int = FRAMES_PER_EPISODE,
    image_format: str = "png",
) -> list[Path]:
    """Render `frames` frames of `split` into `out/frames-000000.tar`, ... (`shard_size` each).

    Returns the shard paths. Stale `frames-NNNNNN.tar` shards in `out` beyond the new count (from
    an earlier, larger run) are removed so that a folder pattern reads exactly this data set.
    """
    for name, value, low in (
        ("frames", frames, 1),
        ("shard_size", shard_size, 1),
        ("image_size", image_size, 16),
        ("frames_per_episode", frames_per_episode, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise OptionError(f"Expected {name} to be an integer >= {low}, got {value!r}.")
    if split not in _SPLIT_IDS:
        raise OptionError(f"Expected split in {SPLITS}, got {split!r}.")
    out = local_path(out, "the frames folder OUT")
    if out.exists() and not out.is_dir():
        raise OptionError(f"Expected {out} to be a folder for the shards, got a file.")
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    members: list[tuple[str, bytes]] = []
    stream = iter_frames(
        frames, split=split, seed=seed, image_size=image_size, frames_per_episode=frames_per_episode
    )
    for count, frame in enumerate(stream, start=1):
        members += encode_sample(frame, image_format)
        if count % shard_size == 0 or count == frames:
            path = out / f"frames-{len(paths):06d}.tar"
            write_tar(path, members)
            paths.append(path)
            members = []
    for stale in out.iterdir():
        match = _SHARD_RE.match(stale.name)
        if match and int(match.group(1)) >= len(paths):
            stale.unlink()
    return paths
