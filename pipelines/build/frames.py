"""Frames in: WebDataset tar shards of robot frames, read without the WebDataset pipeline.

A shard is a plain POSIX tar whose members are grouped into samples by key, the WebDataset way:
`d/e0001-s003.png` and `d/e0001-s003.json` are the `png` and `json` of sample `d/e0001-s003`
(the key is the member path up to the first dot of its file name; members of one sample are
consecutive). A frame sample holds one image (`jpg`/`jpeg`/`png`/`webp`/...), and for training a
`json` (instruction, episode, step, ...) and an `action.npy` (float32, (7,)).

Nothing here ever unpickles: `.npy` is loaded with `allow_pickle=False` and pickle members
(`.pyd`, `.pickle`) are ignored. The build reads shards with `iter_samples` (one pass, sequential
I/O); the training stream may use WebDataset itself on the same files.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from featurecache.errors import FeatureCacheError

__all__ = [
    "IMAGE_EXTS",
    "BadFrameError",
    "FrameSample",
    "FramesNotFoundError",
    "count_samples",
    "decode_image",
    "expand_frame_paths",
    "iter_keys",
    "iter_samples",
    "split_member_name",
]

# Image extensions recognised in a sample, in order of preference when a sample has several.
IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "ppm")
# Member names whose basename starts with "__" (e.g. "__index__") are metadata, not samples.
_META_RE = re.compile(r"(^|/)__[^/]*__($|/|\.)")
# WebDataset's key rule: the path up to the first dot of the basename, then the extension(s).
_KEY_RE = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]+)$")


class FramesNotFoundError(FeatureCacheError):
    """A frames pattern, file or folder that names no tar shard."""


class BadFrameError(FeatureCacheError):
    """A sample that cannot be used as a frame (no image, undecodable image, bad action)."""


@dataclass(frozen=True, slots=True)
class FrameSample:
    """One frame sample of a tar shard.

    key: the sample's `__key__` (unique across a dataset, no dots).
    image_bytes: the encoded image (empty when the sample has none: a bad frame).
    image_ext: its extension ("png", "jpg", ...; "" when none).
    meta: the parsed `json` member, or None.
    action: the `action.npy` member, float32 array (7,) for robot frames, or None.
    source: the tar shard this sample came from (str path).
    """

    key: str
    image_bytes: bytes
    image_ext: str
    meta: dict | None
    action: np.ndarray | None
    source: str


def expand_frame_paths(patterns: Sequence[str]) -> list[Path]:
    """Tar shards named by `patterns`, in the given order, each pattern's matches sorted.

    A pattern is a tar file, a glob (`d/*.tar`), a brace range (`d/frames-{000000..000009}.tar`,
    expanded before globbing) or a folder (its `*.tar`, sorted). A path named twice is kept once.
    Raises FramesNotFoundError naming the pattern when one matches nothing.
    """
    if isinstance(patterns, str | Path):
        patterns = [str(patterns)]
    if not patterns:
        raise FramesNotFoundError("Expected at least one frames pattern, got none.")
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        matches: list[Path] = []
        for expanded in braceexpand(str(pattern)):
            path = Path(expanded).expanduser()
            if path.is_dir():
                matches += sorted(p for p in path.glob("*.tar") if p.is_file())
            elif glob.has_magic(expanded):
                matches += sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
            elif path.is_file():
                matches.append(path)
            else:
                raise FramesNotFoundError(
                    f"Expected an existing tar file, folder or glob for frames, "
                    f"got {expanded!r} (from pattern {pattern!r}), which does not exist."
                )
        if not matches:
            raise FramesNotFoundError(
                f"Expected frames pattern {pattern!r} to match at least one tar shard, "
                f"got no match."
            )
        for path in matches:
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                out.append(path)
    return out


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, WebDataset's way, or None for metadata members and
    names without an extension. `a/b.c.npy` -> ("a/b", "c.npy")."""
    if _META_RE.search(name):
        return None
    match = _KEY_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def _group_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {ext: member}) per sample, consecutive members grouped; reads headers only."""
    key: str | None = None
    members: dict[str, tarfile.TarInfo] = {}
    for info in tar:
        if not info.isfile():
            continue
        parts = split_member_name(info.name)
        if parts is None:
            continue
        member_key, ext = parts
        if member_key != key:
            if key is not None:
                yield key, members
            key, members = member_key, {}
        members[ext] = info
    if key is not None:
        yield key, members


def count_samples(tar_path: str | Path) -> int:
    """Number of samples (distinct consecutive keys) in a tar shard; reads member headers only."""
    with tarfile.open(tar_path, "r:*") as tar:
        return sum(1 for _ in _group_members(tar))


def iter_keys(tar_path: str | Path) -> Iterator[str]:
    """The sample keys of a tar shard in order; reads member headers only."""
    with tarfile.open(tar_path, "r:*") as tar:
        for key, _ in _group_members(tar):
            yield key


def iter_samples(tar_path: str | Path) -> Iterator[FrameSample]:
    """The frame samples of a tar shard, in order.

    A sample without an image gets `image_bytes=b""` (a bad frame, for the caller to fail or skip
    on); a malformed `json` or `action.npy` raises BadFrameError naming the shard and key.
    """
    source = str(tar_path)
    with tarfile.open(tar_path, "r:*") as tar:
        for key, members in _group_members(tar):
            image_ext = next((e for e in IMAGE_EXTS if e in members), "")
            image_bytes = _read(tar, members[image_ext]) if image_ext else b""
            meta = None
            if "json" in members:
                try:
                    meta = json.loads(_read(tar, members["json"]))
                except (ValueError, UnicodeDecodeError) as err:
                    raise BadFrameError(
                        f"Expected valid JSON in {source} key {key!r} (json), got: {err}"
                    ) from err
            action = None
            if "action.npy" in members:
                try:
                    action = np.load(
                        io.BytesIO(_read(tar, members["action.npy"])), allow_pickle=False
                    )
                except ValueError as err:
                    raise BadFrameError(
                        f"Expected a plain .npy array in {source} key {key!r} (action.npy), "
                        f"got: {err}"
                    ) from err
            yield FrameSample(key, image_bytes, image_ext, meta, action, source)


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    assert handle is not None  # regular files always have a handle
    return handle.read()


def decode_image(data: bytes, ext: str = "") -> Image.Image:
    """Decode an encoded image to an RGB PIL image (fully loaded).

    Raises BadFrameError when `data` is empty or not a decodable image.
    """
    if not data:
        raise BadFrameError(f"Expected an image ({'/'.join(IMAGE_EXTS)}), got none.")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for corrupt data
        raise BadFrameError(
            f"Expected a decodable {ext or 'image'} ({len(data)} bytes), got: {err}"
        ) from err
    return image.convert("RGB") if image.mode != "RGB" else image
