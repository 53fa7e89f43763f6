"""LeRobot videos in: the frames of a camera's mp4 files, decoded in order with PyAV (FFmpeg's
decoders: AV1, H.264, HEVC...), each row's frame the one nearest its timestamp.

    cursor = VideoCursor(fps=30)
    frame = cursor.frame_at(Path("videos/top/chunk-000/file-000.mp4"), 12.5, "ep000003-f000375")

A cursor keeps one file open and decodes forward; a time before the current frame (or another
file) reopens and seeks to the key frame before it. A time with no decoded frame within half a
frame period is refused (LeRobotError naming the key, time and file): video and data disagree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.pipelines.precompute.importers.lerobot_checks import LeRobotError

__all__ = ["VideoCursor"]


class VideoCursor:
    """Sequential PyAV decoding of one camera's video files, with the frame nearest a time."""

    def __init__(self, fps: float) -> None:
        self.tolerance = 0.5 / fps  # frames are 1/fps apart: the nearest one is unambiguous
        self.path: Path | None = None
        self.container: Any = None
        self.decoded: Iterator[Any] = iter(())
        self.current: Any = None

    def _open(self, path: Path, seek_to: float) -> None:
        import av

        self.close()
        if not path.is_file():
            raise LeRobotError(f"Expected the video file {path}, found none")
        try:
            self.container = av.open(str(path))
            stream = self.container.streams.video[0]
            stream.thread_type = "AUTO"
            if seek_to > 1.0:  # to the key frame before; decoding runs forward from there
                self.container.seek(int((seek_to - 1.0) / stream.time_base), stream=stream)
            self.decoded = self.container.decode(stream)
        except (av.error.FFmpegError, IndexError) as err:
            raise LeRobotError(f"Expected a decodable video in {path}, got: {err}") from err
        self.path, self.current = path, None

    def frame_at(self, path: Path, t: float, key: str) -> np.ndarray:
        """uint8 (H, W, 3) RGB: the decoded frame nearest to time `t` (seconds) in `path`."""
        if path != self.path or (
            self.current is not None and t < self.current.time - self.tolerance
        ):
            self._open(path, t)
        while self.current is None or self.current.time < t - self.tolerance:
            self.current = next(self.decoded, None)
            if self.current is None:
                break
        if self.current is None or abs(self.current.time - t) > self.tolerance:
            got = "the end of the video" if self.current is None else f"{self.current.time:.4f} s"
            raise LeRobotError(
                f"Expected a video frame at {t:.4f} s (+-{self.tolerance:.4f}) for {key} in "
                f"{path}, got {got} (video and data timestamps disagree)"
            )
        return self.current.to_ndarray(format="rgb24")

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container, self.path, self.current = None, None, None
