"""LeRobot datasets in: a local LeRobot dataset (format v3.0, or v2.0/v2.1) -> WebDataset shards.

    summary = import_lerobot("aloha_dataset", "data/aloha", cameras=["top"], shard_size=1000)

What is read (LeRobot's own layout, `meta/info.json` first):
    v3.0   meta/tasks.parquet (task string -> task_index), meta/episodes/chunk-*/file-*.parquet
           (per episode: length, data/chunk_index + data/file_index, and per video key
           videos/<key>/chunk_index, file_index, from_timestamp), data/chunk-*/file-*.parquet
           (many episodes per file), videos/<key>/chunk-*/file-*.mp4 (many episodes per file,
           episode e starting at its from_timestamp).
    v2.x   meta/tasks.jsonl, meta/episodes.jsonl, one parquet and one mp4 per episode
           (info.json's data_path / video_path templates; each video starts at 0).
Features of dtype "video" are decoded from the mp4s with PyAV (FFmpeg: AV1, H.264, HEVC...),
sequentially, a file at a time; the frame used for a row is the decoded frame nearest to
`from_timestamp + timestamp`, refused (naming episode, frame and file) when none is within half
a frame period. Features of dtype "image" are the encoded images stored in the parquet.

What is written per frame (featurecache.samples contract), key `ep{episode:06d}-f{frame:06d}`:
    key.<camera>.png        one image per camera ("observation.images.top" -> camera "top");
                            with one camera chosen, the plain key.png (what `build` without
                            --cameras and `train` read), its name in the json's "camera"
    key.json                instruction (the frame's task), episode, step (= frame_index),
                            timestamp, index, task_index, state (a list), and every scalar
                            feature by name
    key.action.npy          float32 (A,) as stored (A from the data: 6, 7, 14, ...)
    key.state.npy           "observation.state" as stored (its dtype; the json's copy is for
                            readers of json); other vector features as key.<name>.npy
Before anything is written, the whole dataset is checked (lerobot_checks: fps, the episodes
table against info.json, every episode's rows, timestamps and vector columns); NaN/Inf scalars
go into the json as null.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from featurecache.errors import OptionError
from featurecache.pipelines.precompute.importers import DEFAULT_SHARD_SIZE
from featurecache.pipelines.precompute.importers.lerobot_checks import (
    INDEX_COLUMNS,
    LeRobotError,
    check_data,
    check_episodes,
    check_features,
    check_fps,
    check_totals,
    episode_field,
    read_columns,
)
from featurecache.pipelines.precompute.importers.lerobot_video import VideoCursor
from featurecache.pipelines.precompute.importers.tars import ImageFormat, TarShardWriter
from featurecache.samples import DEFAULT_CAMERA, decode_image

__all__ = [
    "Episode",
    "ImportSummary",
    "LeRobotDataset",
    "LeRobotError",
    "LeRobotFrame",
    "camera_name",
    "field_name",
    "frame_key",
    "import_lerobot",
]

VERSIONS: Final = ("v2.0", "v2.1", "v3.0")
_IMAGE_PREFIXES: Final = ("observation.images.", "observation.image.", "observation.")
_CONTRACT_VECTORS: Final = ("action", "observation.state")  # always <field>.npy, any width


def frame_key(episode: int, frame: int) -> str:
    """The sample key of (episode, frame): `ep000123-f000045`, rebuildable by users."""
    return f"ep{episode:06d}-f{frame:06d}"


def camera_name(feature: str) -> str:
    """The camera name of a LeRobot image/video feature: `observation.images.cam_high` ->
    `cam_high`; lower-cased, other characters -> "_", a leading digit gets a "cam" prefix."""
    name = feature
    for prefix in _IMAGE_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix) :]
            break
    name = re.sub(r"[^a-z0-9_-]", "_", name.lower())
    return name if name[:1].isalpha() else f"cam{name}"


def field_name(feature: str) -> str:
    """The `<field>.npy` name of a vector feature: `action` -> action, `observation.state` ->
    state, `observation.environment_state` -> environment_state."""
    name = feature.removeprefix("observation.")
    name = re.sub(r"[^a-z0-9_]", "_", name.lower())
    return name if name[:1].isalpha() or name[:1] == "_" else f"f{name}"


@dataclass(frozen=True, slots=True)
class Episode:
    """One episode: its rows live in `data_file`; each video feature's frames in a file,
    starting at a time (v3: several episodes per file; v2: one, from 0); `listed_in`: the
    episodes table that lists it."""

    index: int
    length: int
    data_file: Path
    videos: dict[str, tuple[Path, float]]
    listed_in: Path


@dataclass(frozen=True, slots=True)
class LeRobotFrame:
    """One frame: key, episode, frame index, images {camera: uint8 (H, W, 3)}, the json meta and
    vector features {field: array}."""

    key: str
    episode: int
    frame: int
    images: dict[str, np.ndarray]
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote: frames, episodes, cameras, shards (paths) and the version read."""

    frames: int
    episodes: int
    cameras: tuple[str, ...]
    shards: tuple[str, ...]
    version: str

    def __str__(self) -> str:
        return (
            f"{self.frames} frames of {self.episodes} episodes (LeRobot {self.version}, cameras "
            f"{', '.join(self.cameras)}) -> {len(self.shards)} shard(s) under "
            f"{Path(self.shards[0]).parent if self.shards else '-'}"
        )


class LeRobotDataset:
    """A local LeRobot dataset folder, parsed and checked; `frames()` iterates it in order.

    root: the dataset folder (holding meta/info.json). Raises LeRobotError naming the file at
    fault when the folder is not a LeRobot dataset of a supported version.
    """

    def __init__(self, root: str | Path) -> None:
        import pyarrow.parquet as pq

        self.root = Path(root)
        self.info = _read_json(self.root / "meta" / "info.json")
        self.version = str(self.info.get("codebase_version", ""))
        if self.version not in VERSIONS:
            raise LeRobotError(
                f"Expected a LeRobot dataset of version {'/'.join(VERSIONS)} in "
                f"{self.root / 'meta' / 'info.json'}, got codebase_version {self.version!r}"
            )
        info_path = self.root / "meta" / "info.json"
        self.fps = check_fps(self.info, info_path)
        self.features: dict[str, dict] = check_features(self.info, info_path)
        videos = [k for k, f in self.features.items() if f["dtype"] == "video"]
        if videos and not isinstance(self.info.get("video_path"), str):
            raise LeRobotError(
                f"Expected a field 'video_path' (a path template) in {info_path} for the video "
                f"features {videos}, got {self.info.get('video_path')!r}"
            )
        if not isinstance(self.info.get("data_path", ""), str):
            raise LeRobotError(f"Expected a str field 'data_path' in {info_path}, got "
                               f"{self.info.get('data_path')!r}")  # fmt: skip
        visual = [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]
        self.cameras = {camera_name(k): k for k in visual}  # camera -> feature key
        if len(self.cameras) != len(visual):
            raise LeRobotError(f"Expected distinct camera names for {visual} in {self.root}")
        if self.version == "v3.0":
            self.tasks = _tasks_v3(pq.read_table(self.root / "meta" / "tasks.parquet"))
            self.episodes = self._episodes_v3(pq)
        else:
            self.tasks = {
                int(r["task_index"]): str(r["task"])
                for r in _read_jsonl(self.root / "meta" / "tasks.jsonl")
            }
            self.episodes = self._episodes_v2()
        check_episodes(self.episodes)

    @property
    def total_frames(self) -> int:
        return sum(e.length for e in self.episodes)

    @property
    def vectors(self) -> dict[str, list[int]]:
        """{feature: declared shape} of the features written as `<field>.npy`: action and
        observation.state (any width, 1 included), and every other numeric feature of more than
        one value."""
        return {
            k: list(f.get("shape") or [1])
            for k, f in self.features.items()
            if f["dtype"] not in ("video", "image", "string")
            and k not in INDEX_COLUMNS
            and (k in _CONTRACT_VECTORS or int(np.prod(f.get("shape") or [1])) > 1)
        }

    def check(self) -> None:
        """Read every episode's rows and refuse what would import with loss (lerobot_checks)."""
        check_data(self.episodes, self.fps, self.vectors, self.root / "data")
        check_totals(self.episodes, self.info, self.root / "meta" / "info.json")

    def _episodes_v3(self, pq: Any) -> list[Episode]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise LeRobotError(f"Expected meta/episodes/chunk-*/file-*.parquet in {self.root}")
        data_tpl = self.info.get(
            "data_path", "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        )
        video_tpl = self.info.get("video_path") or ""
        out = []
        for file in files:
            for row in pq.read_table(file).to_pylist():
                videos = {}
                for key, feature in self.features.items():
                    if feature.get("dtype") != "video":
                        continue
                    path = video_tpl.format(
                        video_key=key,
                        chunk_index=episode_field(row, f"videos/{key}/chunk_index", file),
                        file_index=episode_field(row, f"videos/{key}/file_index", file),
                    )
                    start = float(episode_field(row, f"videos/{key}/from_timestamp", file))
                    videos[key] = (self.root / path, start)
                data = data_tpl.format(
                    chunk_index=episode_field(row, "data/chunk_index", file),
                    file_index=episode_field(row, "data/file_index", file),
                )
                index = int(episode_field(row, "episode_index", file))
                length = int(episode_field(row, "length", file))
                out.append(Episode(index, length, self.root / data, videos, file))
        return sorted(out, key=lambda e: e.index)

    def _episodes_v2(self) -> list[Episode]:
        chunks = int(self.info.get("chunks_size", 1000))
        table = self.root / "meta" / "episodes.jsonl"
        if "data_path" not in self.info:
            raise LeRobotError(f"Expected a field 'data_path' in {self.root / 'meta/info.json'}")
        out = []
        for row in _read_jsonl(table):
            index = int(episode_field(row, "episode_index", table))
            fmt = {"episode_chunk": index // chunks, "episode_index": index}
            videos = {
                key: (self.root / self.info["video_path"].format(video_key=key, **fmt), 0.0)
                for key, feature in self.features.items()
                if feature.get("dtype") == "video"
            }
            data = self.root / self.info["data_path"].format(**fmt)
            length = int(episode_field(row, "length", table))
            out.append(Episode(index, length, data, videos, table))
        return sorted(out, key=lambda e: e.index)

    def select_cameras(self, names: Sequence[str] | None) -> dict[str, str]:
        """{camera: feature key} for `names` (camera names or feature keys; None: all)."""
        if not self.cameras:
            raise LeRobotError(f"Expected at least one image or video feature in {self.root}")
        if not names:
            return dict(self.cameras)
        out = {}
        by_key = {key: cam for cam, key in self.cameras.items()}
        for name in names:
            camera = name if name in self.cameras else by_key.get(name)
            if camera is None:
                raise OptionError(
                    f"Expected --cameras among {sorted(self.cameras)} (or their feature keys) "
                    f"for {self.root}, got {name!r}"
                )
            out[camera] = self.cameras[camera]
        return out

    def frames(self, cameras: Sequence[str] | None = None) -> Iterator[LeRobotFrame]:
        """Every frame of every episode, in order (see the module docstring)."""
        chosen = self.select_cameras(cameras)
        vectors = {k: field_name(k) for k in self.vectors}
        if len(set(vectors.values())) != len(vectors):
            raise LeRobotError(f"Expected distinct field names for {sorted(vectors)}")
        rows = _DataFiles()
        cursors = {camera: VideoCursor(self.fps) for camera in chosen}
        try:
            for episode in self.episodes:
                table = rows.episode(episode)
                for i in range(episode.length):
                    yield self._frame(episode, table, i, chosen, vectors, cursors)
        finally:
            for cursor in cursors.values():
                cursor.close()

    def _frame(
        self,
        episode: Episode,
        table: dict[str, np.ndarray],
        i: int,
        chosen: dict[str, str],
        vectors: dict[str, str],
        cursors: dict[str, VideoCursor],
    ) -> LeRobotFrame:
        frame = int(table["frame_index"][i])
        key = frame_key(episode.index, frame)
        timestamp = float(table["timestamp"][i])
        task_index = int(table["task_index"][i]) if "task_index" in table else -1
        images = {}
        for camera, feature in chosen.items():
            if self.features[feature]["dtype"] == "video":
                path, start = episode.videos[feature]
                images[camera] = cursors[camera].frame_at(path, start + timestamp, key)
            else:
                data = table[feature][i]["bytes"]
                images[camera] = np.asarray(decode_image(data, "", f"{key} {feature}"))
        meta: dict[str, Any] = {
            "instruction": self.tasks.get(task_index, ""),
            "episode": episode.index,
            "step": frame,
            "timestamp": timestamp,
            "index": int(table["index"][i]) if "index" in table else -1,
            "task_index": task_index,
        }
        arrays = {}
        for column, values in table.items():
            if column in vectors:
                arrays[vectors[column]] = np.atleast_1d(values[i])
            elif column not in INDEX_COLUMNS and column not in chosen.values():
                value = values[i]
                if isinstance(value, np.generic | int | float | bool | str):
                    meta[column] = value.item() if isinstance(value, np.generic) else value
        if "state" in arrays:  # the json's state (DESIGN's sample contract; pi0's state_key)
            meta["state"] = [float(x) for x in np.ravel(arrays["state"])]
        return LeRobotFrame(key, episode.index, frame, images, meta, arrays)


class _DataFiles:
    """The rows of one episode from its data parquet (the last file read is kept: episodes of
    a v3 file are read one after the other). Columns -> numpy: vectors (rows, width)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.columns: dict[str, np.ndarray] = {}

    def episode(self, episode: Episode) -> dict[str, np.ndarray]:
        if episode.data_file != self.path:
            self.columns = read_columns(episode.data_file)
            self.path = episode.data_file
        mask = self.columns["episode_index"] == episode.index
        rows = {name: values[mask] for name, values in self.columns.items()}
        got = int(mask.sum())
        frames = rows["frame_index"]
        if got != episode.length or not np.array_equal(frames, np.arange(got)):
            raise LeRobotError(
                f"Expected episode {episode.index} to have frames 0..{episode.length - 1} in "
                f"{episode.data_file}, got {got} rows (frame_index {frames[:3].tolist()}...)"
            )
        return rows


def _tasks_v3(table: Any) -> dict[int, str]:
    """meta/tasks.parquet: a task_index column and the task strings as the pandas index (stored
    as a column named by the pandas metadata, "task" or "__index_level_0__")."""
    names = table.column_names
    index_cols = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}") or b"{}").get(
        "index_columns", []
    )
    text = next(
        (c for c in ["task", *[c for c in index_cols if isinstance(c, str)]] if c in names), None
    )
    if text is None or "task_index" not in names:
        raise LeRobotError(
            f"Expected columns task and task_index in meta/tasks.parquet, got {names}"
        )
    return dict(
        zip(
            (int(i) for i in table.column("task_index").to_pylist()),
            (str(t) for t in table.column(text).to_pylist()),
            strict=True,
        )
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LeRobotError(
            f"Expected a LeRobot dataset folder holding {path.relative_to(path.parents[1])}, "
            f"found none in {path.parents[1]}"
        ) from None
    except (OSError, ValueError) as err:
        raise LeRobotError(f"Expected readable JSON in {path}, got: {err}") from err


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise LeRobotError(f"Expected {path}, found none") from None
    except ValueError as err:
        raise LeRobotError(f"Expected JSON lines in {path}, got: {err}") from err


def import_lerobot(
    root: str | Path,
    out: str | Path,
    *,
    cameras: Sequence[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    image_format: ImageFormat = "png",
    progress: bool = True,
) -> ImportSummary:
    """Convert the LeRobot dataset at `root` into WebDataset shards under `out` (a new or empty
    folder): `shard_size` frames per shard, one image per camera of `cameras` (default: all;
    a single camera is written as the plain image, see the module docstring)."""
    dataset = LeRobotDataset(root)
    chosen = dataset.select_cameras(cameras)
    dataset.check()  # the whole dataset, before anything is written
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=dataset.total_frames, unit="frame", desc="import", dynamic_ncols=True)
    try:
        with TarShardWriter(out, shard_size=shard_size, image_format=image_format) as writer:
            for frame in dataset.frames(list(chosen)):
                images, meta = frame.images, frame.meta
                if len(chosen) == 1:  # one camera: the plain single-camera sample
                    ((camera, image),) = images.items()
                    images, meta = {DEFAULT_CAMERA: image}, {**meta, "camera": camera}
                writer.write(frame.key, images=images, meta=meta, arrays=frame.arrays)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return ImportSummary(
        frames=writer.samples,
        episodes=len(dataset.episodes),
        cameras=tuple(chosen),
        shards=tuple(str(p) for p in writer.paths),
        version=dataset.version,
    )
