"""Value codecs (fp16 cast, int8 per-token absmax quantization) and the standard Zarr v3 codec
chains the arrays are stored with. Quantization happens here, in the writer, never inside Zarr:
a plain Zarr v3 reader gets int8 values and float32 scales and multiplies them itself.

int8 (per token, i.e. per (row, token) vector over `dim`):
    scale = max_d |x_d| / 127                   float32, 0 for an all-zero token
    q_d   = clip(round_half_even(x_d / scale), -127, 127)   int8 (0 where scale == 0)
    x_d  ~= q_d * scale                         |error| <= scale / 2 per element
"""

from __future__ import annotations

from typing import Any

import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from featurecache.format import INT8_LEVELS, ZSTD_LEVEL


def to_numpy_float(x: Any) -> np.ndarray:
    """A float array (numpy or torch, any float dtype incl. bfloat16) as a numpy array on the CPU,
    without copying when it already is one."""
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.cpu().numpy()
    return np.asarray(x)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float (n, tokens, dim) -> (q int8 (n, tokens, dim), scale float32 (n, tokens))."""
    x = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x).max(axis=-1)
    scale = (absmax / np.float32(INT8_LEVELS)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.rint(x / safe[..., None])
    np.clip(q, -INT8_LEVELS, INT8_LEVELS, out=q)
    return q.astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q int8 (..., tokens, dim), scale float32 (..., tokens) -> float32 (..., tokens, dim)."""
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


def inner_codecs() -> dict[str, Any]:
    """create_array kwargs of the per-chunk codec chain: bytes (little endian) -> zstd -> crc32c.
    For sharded arrays this is the chain inside each shard; the shard index keeps zarr's default
    (bytes -> crc32c)."""
    return {
        "serializer": BytesCodec(endian="little"),
        "compressors": [ZstdCodec(level=ZSTD_LEVEL, checksum=False), Crc32cCodec()],
        "filters": None,
    }
