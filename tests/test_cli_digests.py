"""Frames joined to the wrong targets (issue 9, item 2): two frame sets with the same keys and
other images (`sample-data --seed 0` vs `--seed 7`) no longer train against each other's cache.
The build records each row's source digest, `train` refuses (or with --on-mismatch skip, leaves
out) frames whose bytes differ, `verify --frames` reports them, and a version-1 cache without
digests still trains, saying it cannot check. Oracle: the tars' raw member bytes (tarfile,
hashlib), independent of featurecache's sample rules."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import featurecache as fc
from featurecache.cli import main
from featurecache.format import ATTRS_KEY, GROUP_METADATA, sample_digest
from featurecache.pipelines.demo.sample_data import write_sample_data

TRAIN = ("--student", "tiny-vla", "--steps", "2", "--batch-size", "4", "--lambda", "0.2")
QUIET = ("--no-plot", "--no-progress", "--shuffle-buffer", "4")


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def png_bytes(folder: Path) -> dict[str, bytes]:
    """{key: png bytes} straight from the tars (the oracle: no featurecache code)."""
    out = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    out[m.name[: -len(".png")]] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return out


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("frames")
    for seed in (0, 7):
        write_sample_data(root / f"seed{seed}", frames=16, shard_size=8, image_size=32, seed=seed)
    mixed = root / "mixed"  # seed 0's first shard, seed 7's second (same keys, other images)
    mixed.mkdir()
    shutil.copy(root / "seed0" / "frames-000000.tar", mixed / "frames-000000.tar")
    shutil.copy(root / "seed7" / "frames-000001.tar", mixed / "frames-000001.tar")
    return {"seed0": root / "seed0", "seed7": root / "seed7", "mixed": mixed}


def craft_cache(path: Path, frames: Path) -> Path:
    """A cache of `frames` written through the writer API (no teacher): a 7x7 layer for tiny-vla,
    each row's digest from its tar's png bytes."""
    spec = fc.CacheSpec((fc.LayerSpec("10", 49, 8, grid=(7, 7)),), "int8", 8)
    tars = sorted(frames.glob("*.tar"))
    by_tar = []
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            pngs = [m for m in tar.getmembers() if m.name.endswith(".png")]
            by_tar.append([(m.name[:-4], tar.extractfile(m).read()) for m in pngs])  # type: ignore[union-attr]
    writer = fc.create_cache(
        path, spec, fc.plan_blocks([(str(t), len(s)) for t, s in zip(tars, by_tar, strict=True)], 8)
    )
    for b, samples in enumerate(by_tar):
        bw = writer.open_block(b)
        keys = [k for k, _ in samples]
        x = np.random.default_rng(b).standard_normal((len(keys), 49, 8)).astype(np.float32)
        bw.append(keys, {"10": x}, [sample_digest({"": png}) for _, png in samples])
        writer.mark_done(bw.finish())
    return path


def test_train_refuses_frames_with_other_images(frames, tmp_path: Path) -> None:
    cache = craft_cache(tmp_path / "c.zarr", frames["seed0"])
    code, out = run(
        "train", frames["seed0"], "--cache", cache, "--out", tmp_path / "ok", *TRAIN, *QUIET
    )
    assert code == 0, out  # the frames the cache was built from: no false alarm
    code, out = run(
        "train", frames["seed7"], "--cache", cache, "--out", tmp_path / "bad", *TRAIN, *QUIET
    )
    assert code == 1 and "Traceback" not in out, out
    line = next(x for x in out.splitlines() if x.startswith("featurecache train: error:"))
    key = re.search(r"sample '([^']+)'", line).group(1)
    assert png_bytes(frames["seed0"])[key] != png_bytes(frames["seed7"])[key]  # truly another image
    assert str(frames["seed7"]) in line and str(frames["seed0"]) in line  # both sources named
    assert "--on-mismatch skip" in line
    assert not (tmp_path / "bad" / "checkpoint").exists()


def test_on_mismatch_skip_leaves_exactly_the_other_images_out(frames, tmp_path: Path) -> None:
    cache = craft_cache(tmp_path / "c.zarr", frames["seed0"])
    run_dir = tmp_path / "run"
    code, out = run(
        "train", frames["mixed"], "--cache", cache, "--out", run_dir, *TRAIN, *QUIET,
        "--on-mismatch", "skip", "--on-missing", "skip", "--steps", "3",
    )  # fmt: skip
    assert code == 0, out
    a, b = png_bytes(frames["seed0"]), png_bytes(frames["mixed"])
    left_out = sum(1 for k in b if k not in a or a[k] != b[k])  # oracle: missing or other bytes
    assert left_out == 8
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["missing"] == left_out  # one pass = 3 batches of 4 over the 8 kept frames


def test_an_epoch_with_every_frame_skipped_names_why(frames, tmp_path: Path) -> None:
    """seed 7's frames against seed 0's cache with both skips: nothing is left to train on. The
    one line (exit 1, not a usage error or 'internal error') counts the frames the cache lacks
    and those with other images, each with the option that skipped it."""
    cache = craft_cache(tmp_path / "c.zarr", frames["seed0"])
    code, out = run("train", frames["seed7"], "--cache", cache, "--out", tmp_path / "r", *TRAIN,
                    *QUIET, "--on-mismatch", "skip", "--on-missing", "skip")  # fmt: skip
    assert code == 1 and "Traceback" not in out and "internal error" not in out, out
    a, b = png_bytes(frames["seed0"]), png_bytes(frames["seed7"])
    lacking = sum(1 for k in b if k not in a)  # oracle: the tars' own members
    other = sum(1 for k in b if k in a and a[k] != b[k])
    assert lacking and other and lacking + other == len(b)
    line = next(x for x in out.splitlines() if x.startswith("featurecache train: error:"))
    assert f"every one of its {len(b)} frames skipped" in line, line
    assert f"{lacking} not in cache {cache} (skipped by --on-missing skip)" in line, line
    assert f"{other} whose images differ" in line and "--on-mismatch skip" in line, line
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_verify_frames_reports_other_images(frames, tmp_path: Path) -> None:
    cache = craft_cache(tmp_path / "c.zarr", frames["seed0"])
    code, out = run("verify", cache, "--frames", frames["seed0"])
    assert code == 0, out
    code, out = run("verify", cache, "--frames", frames["mixed"], "--json")
    report = json.loads(out)
    a, b = png_bytes(frames["seed0"]), png_bytes(frames["mixed"])
    other = sorted(k for k in b if k in a and a[k] != b[k])  # oracle: same key, other bytes
    mismatch = [p for p in report["problems"] if p["kind"] == "digest-mismatch"]
    assert code == 1 and len(mismatch) == 1 and other
    assert mismatch[0]["file"].endswith("frames-000001.tar")
    assert f"under {len(other)} key(s)" in mismatch[0]["message"]
    assert all(p["kind"] == "missing-frame" for p in report["problems"] if p not in mismatch)


def test_version_1_cache_trains_unchecked_and_says_so(frames, tmp_path: Path) -> None:
    cache = craft_cache(tmp_path / "c.zarr", frames["seed0"])
    table = fc.open_cache(cache).manifest.to_json()
    meta = json.loads((cache / GROUP_METADATA).read_text())
    meta["attributes"][ATTRS_KEY] = {**table, "version": 1}  # the version-1 layout, no digests
    (cache / GROUP_METADATA).write_text(json.dumps(meta))
    shutil.rmtree(cache / "digests")
    with pytest.warns(UserWarning, match="cannot check"):
        code, out = run("train", frames["seed7"], "--cache", cache, "--out", tmp_path / "r",
                        *TRAIN, *QUIET, "--on-missing", "skip")  # fmt: skip
    assert code == 0, out


def test_corrupt_cache_during_training_names_the_file(frames, tmp_path: Path) -> None:
    cache = craft_cache(tmp_path / "c.zarr", frames["seed0"])
    shard = cache / "features" / "10" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[30] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code, out = run("train", frames["seed0"], "--cache", cache, "--out", tmp_path / "r",
                    *TRAIN, *QUIET, "--steps", "4")  # fmt: skip
    assert code == 1 and "Traceback" not in out and str(shard) in out, out
    (cache / GROUP_METADATA).write_text("{ not json")
    code, out = run(
        "train", frames["seed0"], "--cache", cache, "--out", tmp_path / "r2", *TRAIN, *QUIET
    )
    assert code == 1 and "Traceback" not in out and str(cache / GROUP_METADATA) in out, out


def test_build_records_each_rows_digest(frames, tmp_path: Path) -> None:
    out = tmp_path / "c.zarr"
    code, text = run("build", frames["seed0"], "--teacher", "efficientnet-lite0@32", "--layers",
                     "4", "--out", out, "--local", "--quiet")  # fmt: skip
    assert code == 0, text
    keys = zarr.open_array(str(out), path="keys", mode="r")[:]
    digests = zarr.open_array(str(out), path="digests", mode="r")[:]
    pngs = png_bytes(frames["seed0"])
    rows = {bytes(k).rstrip(b"\0").decode(): i for i, k in enumerate(keys) if k.any()}
    assert set(rows) == set(pngs)
    for key, png in pngs.items():  # plain zarr + hashlib, no featurecache on this side
        assert bytes(digests[rows[key]]) == hashlib.sha256(png).digest()[:16]
    code, text = run("verify", out, "--frames", frames["seed7"])
    assert code == 1 and "digest-mismatch" in text
