"""featurecache.samples: the one place the sample rules are tested (keys, members, cameras,
grouping, refusals, decoding of every PIL mode against numpy oracles)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurecache.errors import InvalidKeyError
from featurecache.samples import (
    IMAGE_EXTS,
    BadFrameError,
    FramesNotFoundError,
    SampleLayoutError,
    check_key,
    count_samples,
    decode_image,
    expand_frame_paths,
    iter_keys,
    iter_samples,
    member_name,
    split_member_name,
    to_rgb,
)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _png(value: int = 200) -> bytes:
    return _encode(Image.new("RGB", (8, 6), (value, 0, 0)))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# ---- names, keys, cameras -------------------------------------------------------------------


def test_split_member_name_follows_webdataset() -> None:
    assert split_member_name("a/b.c.npy") == ("a/b", "c.npy")
    assert split_member_name("k-1.TOP.PNG") == ("k-1", "top.png")
    assert split_member_name("__index__.json") is None
    assert split_member_name("noext") is None
    assert split_member_name(".hidden") is None


@pytest.mark.parametrize("key", ["a.1", "", " a", "a\x00b", "d/__meta__", "d/"])
def test_check_key_refuses(key: str) -> None:
    with pytest.raises(InvalidKeyError, match="Expected"):
        check_key(key, " (test)")


def test_member_name_round_trips_through_split() -> None:
    assert check_key("d/ep000001-f000002") == "d/ep000001-f000002"
    for ext, camera in [("png", ""), ("jpg", "top"), ("action.npy", ""), ("json", "")]:
        name = member_name("ep1-f2", ext, camera)
        key, got = split_member_name(name)
        assert key == "ep1-f2" and got == (f"{camera}.{ext}" if camera else ext)
    with pytest.raises(InvalidKeyError, match="camera"):
        member_name("k", "png", "1")
    with pytest.raises(InvalidKeyError, match=r"'\.'"):
        member_name("k.1", "png")


# ---- grouping and refusals -------------------------------------------------------------------


def test_samples_group_cameras_json_and_arrays(tmp_path: Path) -> None:
    action = np.arange(9, dtype=np.float32)
    shard = _tar(
        tmp_path / "s.tar",
        [
            ("d/k0.top.png", _png(1)),
            ("d/k0.wrist.jpg", _encode(Image.new("RGB", (4, 4)), "JPEG")),
            ("d/k0.json", b'{"instruction": "pick"}'),
            ("d/k0.action.npy", _npy(action)),
            ("d/k0.pyd", b"never read"),
            ("d/k1.png", _png(2)),
            ("__index__.json", b"{}"),
        ],
    )
    samples = list(iter_samples(shard))
    assert [s.key for s in samples] == list(iter_keys(shard)) == ["d/k0", "d/k1"]
    assert count_samples(shard) == 2
    k0, k1 = samples
    assert k0.cameras == ("top", "wrist") and k1.cameras == ("",)
    assert k0.image("top") == (_png(1), "png") and k0.image("wrist")[1] == "jpg"
    assert k0.meta() == {"instruction": "pick"} and k1.meta() == {}
    np.testing.assert_array_equal(k0.array("action"), action)
    assert k1.array("action") is None and "pyd" not in k0.members
    with pytest.raises(BadFrameError, match=r"plain image.*cameras top, wrist.*--cameras"):
        k0.image()
    with pytest.raises(BadFrameError, match="camera 'side'"):
        k0.image("side")


def test_samples_read_from_a_stream(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "s.tar", [("a.png", _png(1)), ("b.png", _png(2))])
    with open(shard, "rb") as fh:
        assert [s.image()[0] for s in iter_samples(fh, source="pipe")] == [_png(1), _png(2)]


@pytest.mark.parametrize(
    "names",
    [
        ["a.1.png", "a.2.png"],  # dotted keys: camera "1" is no camera
        ["a.x1.png", "a.x1.json", "a.x2.png", "a.x2.json"],  # x.json takes no prefix
        ["f.0001.png", "f.0001.action.npy"],
    ],
)
def test_dotted_keys_are_refused_naming_them(tmp_path: Path, names: list[str]) -> None:
    shard = _tar(tmp_path / "s.tar", [(n, _png() if n.endswith("png") else b"{}") for n in names])
    for read in (iter_keys, lambda p: (s.key for s in iter_samples(p))):
        with pytest.raises(SampleLayoutError, match=r"collapse onto key '(a|f)'.*frames") as err:
            list(read(shard))
        assert str(shard) in str(err.value) and names[0] in str(err.value)


def test_repeated_key_and_member_are_refused(tmp_path: Path) -> None:
    back = _tar(tmp_path / "b.tar", [("a.png", _png()), ("b.png", _png()), ("a.json", b"{}")])
    with pytest.raises(SampleLayoutError, match=r"consecutive.*'a\.json'"):
        list(iter_keys(back))
    twice = _tar(tmp_path / "t.tar", [("a.png", _png()), ("a.png", _png())])
    with pytest.raises(SampleLayoutError, match=r"a\.png more than once"):
        list(iter_samples(twice))


def test_bad_members_name_the_key(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "s.tar", [("k.png", _png()), ("k.json", b"{no"), ("k.x.npy", b"?")])
    (sample,) = iter_samples(shard)
    with pytest.raises(BadFrameError, match=r"'k'.*json"):
        sample.meta()
    with pytest.raises(BadFrameError, match=r"'k'.*x\.npy"):
        sample.array("x")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (sample,) = iter_samples(_tar(tmp_path / "p.tar", [("k.action.npy", pickled.getvalue())]))
    with pytest.raises(BadFrameError, match=r"action\.npy"):
        sample.array("action")


def test_truncated_tar_names_the_file(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "s.tar", [(f"k{i}.png", _png()) for i in range(4)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(FramesNotFoundError, match=r"cut\.tar"):
        list(iter_samples(cut))
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(FramesNotFoundError, match=r"zero\.tar"):
        list(iter_keys(tmp_path / "zero.tar"))


def test_expand_patterns(tmp_path: Path) -> None:
    shards = [_tar(tmp_path / f"f-{i:06d}.tar", [("k.png", _png())]) for i in range(3)]
    assert expand_frame_paths(str(tmp_path)) == shards
    assert expand_frame_paths([str(tmp_path / "f-{000001..000002}.tar")]) == shards[1:]
    assert expand_frame_paths([str(shards[2]), str(tmp_path / "*.tar")]) == [shards[2], *shards[:2]]
    with pytest.raises(FramesNotFoundError, match="nope"):
        expand_frame_paths([str(tmp_path / "nope.tar")])


# ---- decoding: every mode against a numpy oracle ---------------------------------------------


def _rgb(image: Image.Image) -> np.ndarray:
    out = decode_image(_encode(image, "PNG" if image.mode != "CMYK" else "JPEG"), where="k")
    assert out.mode == "RGB"
    return np.asarray(out)


def test_decode_16_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768], [65535, 1000, 128]], dtype=np.uint16)
    expected = np.round(values / 257.0).astype(np.uint8)
    for fmt in ("PNG", "TIFF", "PPM"):  # PPM opens 16-bit grey as mode "I"
        data = _encode(Image.fromarray(values), fmt)
        out = np.asarray(decode_image(data, fmt.lower(), "sample 'k'"))
        np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2), fmt)


def test_decode_palette_la_rgba_and_grey() -> None:
    palette = Image.new("P", (3, 2))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1, 1, 0, 1, 0])
    expected = np.array([[10, 20, 30], [200, 100, 50]], np.uint8)[np.array([[0, 1, 1], [0, 1, 0]])]
    np.testing.assert_array_equal(_rgb(palette), expected)
    la = Image.fromarray(np.dstack([np.full((2, 3), 77, np.uint8), np.zeros((2, 3), np.uint8)]))
    assert la.mode == "LA"
    np.testing.assert_array_equal(_rgb(la), np.full((2, 3, 3), 77))  # alpha dropped
    rgba = np.random.default_rng(0).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(_rgb(Image.fromarray(rgba)), rgba[..., :3])
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(_rgb(Image.fromarray(grey)), np.repeat(grey[..., None], 3, 2))


def test_decode_cmyk_matches_the_formula() -> None:
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)
    out = to_rgb(Image.fromarray(cmyk, mode="CMYK"))  # PIL: rgb = 255 - min(255, c + k)
    expected = 255 - np.minimum(255, cmyk[..., :3].astype(int) + cmyk[..., 3:].astype(int))
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("mode", ["F", "LAB", "I"])
def test_decode_refuses_modes_without_rgb_meaning(mode: str) -> None:
    image = Image.new(mode, (4, 4))
    data = _encode(image, "TIFF")
    with pytest.raises(BadFrameError, match=rf"sample 'k7'.*mode '{mode}'"):
        decode_image(data, "tif", "sample 'k7'")


def test_decode_bad_bytes_and_arrays() -> None:
    with pytest.raises(BadFrameError, match=r"got none"):
        decode_image(b"", "png", "k")
    with pytest.raises(BadFrameError, match=r"decodable png \(5 bytes\) in k"):
        decode_image(b"hello", "png", "k")
    arr = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(arr)), arr)
    np.testing.assert_array_equal(np.asarray(to_rgb(arr[..., :1]))[..., 1], arr[..., 0])
    with pytest.raises(BadFrameError, match="uint8"):
        to_rgb(arr.astype(np.float32), "key 'x'")
    with pytest.raises(BadFrameError, match=r"channels last.*\(3, 5, 6\)"):
        to_rgb(arr.transpose(2, 0, 1).copy())


def test_image_exts_all_decode() -> None:
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    for ext in IMAGE_EXTS:
        fmt = {"jpg": "JPEG", "tif": "TIFF"}.get(ext, ext.upper())
        assert decode_image(_encode(image, fmt), ext).size == (4, 4)
