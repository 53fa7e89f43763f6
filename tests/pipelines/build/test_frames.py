"""frames.py: pattern expansion, WebDataset-style grouping, decoding, bad samples."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurecache.pipelines.build.frames import (
    BadFrameError,
    FramesNotFoundError,
    count_samples,
    decode_image,
    expand_frame_paths,
    iter_keys,
    iter_samples,
    split_member_name,
)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png(color: tuple[int, int, int] = (255, 0, 0), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 6), color if mode == "RGB" else color[0]).save(buf, format="PNG")
    return buf.getvalue()


def test_expand_folder_glob_brace_and_file(sample_data_dir: Path) -> None:
    shards = [sample_data_dir / f"frames-{i:06d}.tar" for i in range(3)]
    assert expand_frame_paths([str(sample_data_dir)]) == shards
    assert expand_frame_paths([str(sample_data_dir / "*.tar")]) == shards
    brace = str(sample_data_dir / "frames-{000001..000002}.tar")
    assert expand_frame_paths([brace]) == shards[1:]
    # one file named twice (once by a glob) is kept once, in first-seen order
    assert expand_frame_paths([str(shards[2]), str(sample_data_dir)]) == [shards[2], *shards[:2]]


@pytest.mark.parametrize("pattern", ["nope/*.tar", "nope.tar", "d-{000000..000001}.tar"])
def test_expand_names_the_pattern_that_matches_nothing(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(FramesNotFoundError, match=r"nope|d-00000"):
        expand_frame_paths([str(tmp_path / pattern)])


def test_expand_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FramesNotFoundError, match="match at least one tar"):
        expand_frame_paths([str(tmp_path)])


def test_split_member_name_follows_webdataset() -> None:
    assert split_member_name("a/b.c.npy") == ("a/b", "c.npy")
    assert split_member_name("k-1.PNG") == ("k-1", "png")
    assert split_member_name("__index__.json") is None
    assert split_member_name("noext") is None


def test_iter_samples_reads_image_json_action(sample_data_dir: Path) -> None:
    shard = sample_data_dir / "frames-000001.tar"
    samples = list(iter_samples(shard))
    assert len(samples) == count_samples(shard) == 16
    assert [s.key for s in samples] == list(iter_keys(shard))
    first = samples[0]
    assert first.key == "train-e00001-s004"  # frames 16.. = episode 1 step 4..
    assert first.image_ext == "png" and first.source == str(shard)
    assert first.meta["episode"] == 1 and first.meta["step"] == 4
    assert first.action.dtype == np.float32 and first.action.shape == (7,)
    image = decode_image(first.image_bytes, first.image_ext)
    assert image.mode == "RGB" and image.size == (64, 64)


def test_decode_converts_to_rgb() -> None:
    assert decode_image(_png((7, 7, 7), mode="L"), "png").mode == "RGB"


def test_missing_and_corrupt_images_are_bad_frames(tmp_path: Path) -> None:
    shard = _tar(
        tmp_path / "bad.tar",
        [("a.png", _png()), ("b.json", b"{}"), ("c.png", b"not a png"), ("__meta__.txt", b"x")],
    )
    a, b, c = list(iter_samples(shard))
    assert decode_image(a.image_bytes, a.image_ext).size == (8, 6)
    assert b.image_bytes == b"" and b.meta == {}
    with pytest.raises(BadFrameError, match="got none"):
        decode_image(b.image_bytes, b.image_ext)
    with pytest.raises(BadFrameError, match="decodable png"):
        decode_image(c.image_bytes, c.image_ext)


def test_never_unpickles(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    shard = _tar(tmp_path / "p.tar", [("a.png", _png()), ("a.action.npy", buf.getvalue())])
    with pytest.raises(BadFrameError, match=r"plain \.npy"):
        list(iter_samples(shard))


def test_bad_json_names_shard_and_key(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "j.tar", [("k1.png", _png()), ("k1.json", b"{oops")])
    with pytest.raises(BadFrameError, match=r"j\.tar key 'k1'"):
        list(iter_samples(shard))
