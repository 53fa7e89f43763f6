"""The WebDataset sample contract: one home for the rules that build, verify, stream and import
share (member names, keys, cameras, grouping, image decoding).

A frame shard is a plain POSIX tar. Its members are grouped into samples the WebDataset way: the
key is the member path up to the first dot of its file name, the rest is the member's extension,
and the members of one sample are consecutive:

    ep000001-f000004.png          the image of sample `ep000001-f000004` (one camera)
    ep000001-f000004.top.png      camera `top`'s image (several cameras: `key.<camera>.<ext>`)
    ep000001-f000004.json         instruction, episode, step, ... (a JSON object)
    ep000001-f000004.action.npy   a `<field>.npy` array (action, state, ...), float32 (A,)

Rules (checked while reading, each refusal naming the tar and the members):
- Keys follow `check_key` (no dot, relative, no control character); members whose names only
  make sense as dotted keys (`a.1.png`, `a.2.json`) are refused: they would collapse onto `a`.
- Camera names start with a letter: `[a-z][a-z0-9_-]*` (extensions are lower-cased).
- A key's members are consecutive and appear once; a key does not come back later in the tar.
- Images: IMAGE_EXTS, decoded to 8-bit RGB by `decode_image` (featurecache.images: 16-bit grey
  scaled, palette and CMYK converted, alpha dropped; other modes refused).
- Metadata members (`__key__`-style names starting with `__`) are skipped; other extensions are
  kept unread. Nothing here unpickles: `.npy` loads with `allow_pickle=False`.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
from braceexpand import braceexpand

from featurecache.errors import BadFrameError, FeatureCacheError, InvalidKeyError
from featurecache.images import IMAGE_EXTS, decode_image, to_rgb
from featurecache.store import is_url, local_path
from featurecache.store_files import expand_url, open_object

__all__ = [
    "DEFAULT_CAMERA",
    "IMAGE_EXTS",
    "BadFrameError",
    "FramesNotFoundError",
    "Sample",
    "SampleLayoutError",
    "check_camera",
    "check_key",
    "count_samples",
    "decode_image",
    "expand_frame_paths",
    "iter_keys",
    "iter_samples",
    "member_name",
    "split_member_name",
    "to_rgb",
]

# The camera of a plain `key.png` image (single-camera data).
DEFAULT_CAMERA: Final = ""
# Members that hold one whole-sample value and therefore take no prefix (`key.json`).
_PLAIN_MEMBERS: Final = ("json", "txt", "cls")

# Member names whose basename starts with "__" (e.g. "__index__") are metadata, not samples.
_META_RE = re.compile(r"(^|/)__[^/]*__($|/|\.)")
# WebDataset's key rule: the path up to the first dot of the basename, then the extension(s).
_KEY_RE = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]+)$")
_CAMERA_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_FIELD_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


class FramesNotFoundError(FeatureCacheError):
    """A frames pattern, file or folder that names no tar shard."""


class SampleLayoutError(FeatureCacheError):
    """A tar whose members cannot be grouped into samples without losing frames: dotted keys that
    collapse, a key that comes back later, a member repeated. Never skippable: fix the tar."""


def check_key(key: object, where: str = "", error: type[Exception] = InvalidKeyError) -> str:
    """`key` if valid, else `error` naming it: the one key rule (tars, Python frames, importers)."""
    if not isinstance(key, str) or not key:
        raise error(f"Expected a non-empty str sample key{where}, got {key!r}")
    why = None
    if "." in key:
        why = "a '.' (WebDataset keys end at the first dot: use '-' or '_')"
    elif any(ord(c) < 32 or ord(c) == 127 for c in key) or key != key.strip():
        why = "control characters (NUL, newline, tab) or leading/trailing whitespace"
    elif key.startswith("/") or "//" in key:
        why = "a leading '/' or an empty path part (keys are relative: 'episode/frame')"
    elif key.endswith("/") or key.rpartition("/")[2].startswith("__"):
        why = "an empty file name or one starting with '__' (reserved for metadata)"
    if why:
        raise error(f"Expected a sample key without {why}{where}, got {key!r}")
    return key


def check_camera(camera: object, where: str = "") -> str:
    """`camera` if it is a valid camera name (`[a-z][a-z0-9_-]*`), else InvalidKeyError."""
    if not isinstance(camera, str) or not _CAMERA_RE.match(camera):
        raise InvalidKeyError(
            f"Expected a camera name of lower-case letters, digits, '_' or '-' starting with a "
            f"letter{where}, got {camera!r}"
        )
    return camera


def member_name(key: str, ext: str, camera: str = DEFAULT_CAMERA) -> str:
    """The tar member name of a sample's member: `key.ext`, or `key.camera.ext` for a camera's
    image. Checks the key and camera: what this returns groups back into the same sample."""
    check_key(key)
    if camera != DEFAULT_CAMERA:
        if ext not in IMAGE_EXTS:
            raise InvalidKeyError(f"Expected an image extension {IMAGE_EXTS}, got {ext!r}")
        return f"{key}.{check_camera(camera)}.{ext}"
    return f"{key}.{ext}"


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, WebDataset's way, or None for metadata members and
    names without an extension. `a/b.c.npy` -> ("a/b", "c.npy"); the extension is lower-cased."""
    if _META_RE.search(name):
        return None
    match = _KEY_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def _dotted_key_evidence(ext: str) -> bool:
    """Whether a member extension can only come from a key with a dot in it (see module doc)."""
    head, _, last = ext.rpartition(".")
    if not head:
        return False
    if last in IMAGE_EXTS:
        return not _CAMERA_RE.match(head)  # `a.1.png`: camera "1" is no camera
    if last in _PLAIN_MEMBERS:
        return True  # `a.1.json`: json takes no prefix
    if last == "npy":
        return not _FIELD_RE.match(head)  # `a.1.action.npy`
    return False


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample of a tar shard, its members still encoded (cheap to buffer and to pickle).

    key: the sample's key (unique across a dataset, no dots).
    source: the tar shard it came from (str path).
    members: extension -> bytes for the members this contract reads: images (`png`,
        `top.png`, ...), `json`, `txt`, `cls` and `<field>.npy`; other members are not read.
    """

    key: str
    source: str
    members: dict[str, bytes]

    @property
    def cameras(self) -> tuple[str, ...]:
        """Cameras with an image, sorted (DEFAULT_CAMERA "" for a plain `key.png`)."""
        return tuple(sorted({_image_camera(ext) for ext in self.members if _is_image(ext)}))

    def image(self, camera: str = DEFAULT_CAMERA) -> tuple[bytes, str]:
        """(encoded bytes, image extension) of `camera` (the arguments of `decode_image`);
        BadFrameError naming the key and the cameras present when the sample has no such
        image."""
        prefix = f"{camera}." if camera else ""
        for ext in IMAGE_EXTS:
            data = self.members.get(prefix + ext)
            if data is not None:
                return data, ext
        have = [c or "(plain image)" for c in self.cameras]
        if camera == DEFAULT_CAMERA and have:
            wanted, hint = "a plain image (key.png)", " (pass --cameras to pick cameras)"
        else:
            wanted, hint = f"camera {camera!r}'s image", ""
        raise BadFrameError(
            f"Expected {wanted} in sample {self.key!r} of {self.source}, got "
            f"{'cameras ' + ', '.join(have) if have else 'no image'}{hint}"
        )

    def meta(self) -> dict[str, Any]:
        """The parsed `json` member ({} when absent); BadFrameError when it is not a JSON object."""
        raw = self.members.get("json")
        if raw is None:
            return {}
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise BadFrameError(
                f"Expected valid JSON in sample {self.key!r} of {self.source} (json), got: {err}"
            ) from err
        if not isinstance(meta, dict):
            raise BadFrameError(
                f"Expected a JSON object in sample {self.key!r} of {self.source} (json), got "
                f"{type(meta).__name__}"
            )
        return meta

    def array(self, field: str) -> np.ndarray | None:
        """The `<field>.npy` member (e.g. "action"), loaded without pickle; None when absent."""
        raw = self.members.get(f"{field}.npy")
        if raw is None:
            return None
        try:
            return np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, EOFError, OSError) as err:
            raise BadFrameError(
                f"Expected a plain .npy array in sample {self.key!r} of {self.source} "
                f"({field}.npy), got: {err}"
            ) from err


def _is_image(ext: str) -> bool:
    return ext.rpartition(".")[2] in IMAGE_EXTS


def _image_camera(ext: str) -> str:
    return ext.rpartition(".")[0]


def _wanted(ext: str) -> bool:
    last = ext.rpartition(".")[2]
    return last in IMAGE_EXTS or last == "npy" or ext in _PLAIN_MEMBERS


def _group(
    members: Iterable[tarfile.TarInfo], source: str
) -> Iterator[tuple[str, list[tuple[str, tarfile.TarInfo]]]]:
    """(key, [(ext, member)]) per sample, consecutive members grouped, every layout rule checked
    (see the module docstring); reads headers only."""
    key: str | None = None
    group: list[tuple[str, tarfile.TarInfo]] = []
    done: set[str] = set()
    for info in members:
        if not info.isfile():
            continue
        parts = split_member_name(info.name)
        if parts is None:
            continue
        member_key, ext = parts
        if member_key != key:
            if key is not None:
                yield _checked(key, group, source)
                done.add(key)
            if member_key in done:
                raise SampleLayoutError(
                    f"Expected the members of sample {member_key!r} to be consecutive in "
                    f"{source}, got {info.name!r} after other samples: a key must not repeat "
                    f"(rewrite the tar with each sample's members together)"
                )
            key, group = member_key, []
        group.append((ext, info))
    if key is not None:
        yield _checked(key, group, source)


def _checked(
    key: str, group: list[tuple[str, tarfile.TarInfo]], source: str
) -> tuple[str, list[tuple[str, tarfile.TarInfo]]]:
    exts = [ext for ext, _ in group]
    check_key(key, f" in {source} (member {group[0][1].name!r})", SampleLayoutError)
    if any(_dotted_key_evidence(ext) for ext in exts):
        names = [f"{key}.{ext}" for ext in exts]
        keys = sorted({f"{key}.{ext.split('.')[0]}" for ext in exts if "." in ext})
        example = next(n for n in names if "." in n[len(key) + 1 :])
        raise SampleLayoutError(
            f"Expected sample keys without dots in {source}, got members "
            f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''} whose keys "
            f"{', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''} all collapse onto key "
            f"{key!r} (WebDataset keys end at the first dot of the file name, so {len(keys)} "
            f"frames would become one). Rename them without dots in the key, e.g. {example} -> "
            f"{key}_{example[len(key) + 1 :]}"
        )
    if len(set(exts)) != len(exts):
        twice = sorted({e for e in exts if exts.count(e) > 1})
        raise SampleLayoutError(
            f"Expected each member once per sample in {source}, got {key!r} with "
            f"{', '.join(f'{key}.{e}' for e in twice)} more than once"
        )
    return key, group


def _open(tar: str | Path | IO[bytes], stream: bool) -> tarfile.TarFile:
    mode = "r|*" if stream else "r:*"
    try:
        if is_url(tar):  # an object in a store: streamed, or seekable by ranged reads
            return tarfile.open(fileobj=open_object(tar, sequential=stream), mode=mode)
        if isinstance(tar, str | Path):
            return tarfile.open(tar, mode)
        return tarfile.open(fileobj=tar, mode=mode)
    except (tarfile.TarError, OSError) as err:
        name = str(tar) if isinstance(tar, str | Path) else repr(tar)
        if isinstance(tar, str | Path) and Path(tar).is_file() and Path(tar).stat().st_size == 0:
            raise FramesNotFoundError(
                f"Expected a tar shard, got an empty file {name!r} (0 bytes: an interrupted copy?)"
            ) from err
        raise FramesNotFoundError(
            f"Expected a readable tar shard, got {name!r}: {err} (is the file complete?)"
        ) from err


def _check_complete(tar: str | Path | IO[bytes], offset: int, source: str) -> None:
    """tarfile ends quietly where a file is cut inside or right after a member header; a complete
    tar has its end-of-archive marker (a zero block) after the last member. FramesNotFoundError
    naming the shard when it is missing. Streams (pipes) cannot be checked."""
    if not isinstance(tar, str | Path):
        return
    with _open(tar, stream=False) as whole:  # offsets count uncompressed bytes, as here
        assert whole.fileobj is not None
        whole.fileobj.seek(offset)
        end = whole.fileobj.read(tarfile.BLOCKSIZE)
    if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
        raise FramesNotFoundError(
            f"Expected a complete tar shard ending with its end-of-archive marker, got {source} "
            f"cut short after {offset} bytes of members (an interrupted copy? copy it again)"
        )


def iter_keys(tar_path: str | Path) -> Iterator[str]:
    """The sample keys of a tar shard in order, layout rules checked; reads headers only."""
    source = str(tar_path)
    with _open(tar_path, stream=False) as tar:
        try:
            for key, _ in _group(tar, source):
                yield key
        except tarfile.TarError as err:
            raise FramesNotFoundError(
                f"Expected a complete tar shard, got {source}: {err}"
            ) from err
        _check_complete(tar_path, tar.offset, source)


def count_samples(tar_path: str | Path) -> int:
    """Number of samples in a tar shard (headers only)."""
    return sum(1 for _ in iter_keys(tar_path))


def iter_samples(tar: str | Path | IO[bytes], source: str | None = None) -> Iterator[Sample]:
    """The samples of a tar shard (a path or a readable binary stream), in order, read in one
    sequential pass (a stream may be a pipe). Members this contract does not read are skipped
    unread. Raises SampleLayoutError (see the module docstring) naming the tar and members."""
    source = str(tar) if source is None else source
    data: dict[str, bytes] = {}  # member name -> bytes, read while the member is current

    with _open(tar, stream=True) as handle:

        def read_as_you_go() -> Iterator[tarfile.TarInfo]:
            for info in handle:  # streaming: a member's data is readable only while current
                parts = split_member_name(info.name) if info.isfile() else None
                if parts is not None and _wanted(parts[1]):
                    fh = handle.extractfile(info)
                    assert fh is not None  # regular files always have a handle
                    data[info.name] = fh.read()
                yield info

        try:
            for key, group in _group(read_as_you_go(), source):
                # the grouping looked one member ahead: pop this sample's members only
                members = {ext: data.pop(info.name) for ext, info in group if _wanted(ext)}
                yield Sample(key, source, members)
        except tarfile.TarError as err:
            raise FramesNotFoundError(
                f"Expected a complete tar shard, got {source}: {err}"
            ) from err
        _check_complete(tar, handle.offset, source)


def expand_frame_paths(patterns: Sequence[str | Path] | str | Path) -> list[Path | str]:
    """Tar shards named by `patterns`, in the given order, each pattern's matches sorted.

    A pattern is a tar file, a glob (`d/*.tar`), a brace range (`d/frames-{000000..000009}.tar`,
    expanded before globbing) or a folder (its `*.tar`, sorted): local (Paths returned) or in an
    object store (s3://, gs://, memory://: listed; URLs returned). A path named twice is kept
    once. Raises FramesNotFoundError naming the pattern when one matches nothing.
    """
    if isinstance(patterns, str | Path):
        patterns = [str(patterns)]
    if not patterns:
        raise FramesNotFoundError("Expected at least one frames pattern, got none.")
    out: list[Path | str] = []
    seen: set[Path | str] = set()
    for pattern in patterns:
        matches: list[Path | str] = []
        for expanded in braceexpand(str(pattern)):
            url = is_url(expanded) and not expanded.startswith("file://")
            path = Path() if url else local_path(expanded, f"FRAMES ({pattern!r})").expanduser()
            found = expand_url(expanded) if url else []  # UnsupportedURLError for x://, http://
            if found or (url and glob.has_magic(expanded)):
                matches += found
            elif not url and path.is_dir():
                matches += sorted(p for p in path.glob("*.tar") if p.is_file())
            elif not url and glob.has_magic(expanded):
                matches += sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
            elif not url and path.is_file():
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
            resolved = path.resolve() if isinstance(path, Path) else path
            if resolved not in seen:
                seen.add(resolved)
                out.append(path)
    return out
