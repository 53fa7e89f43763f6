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

import google_crc32c
import numpy as np
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from featurecache.errors import ChunkError
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


# ---- direct decoding of our own chain (FORMAT.md), used by the reader's fast path --------------
# Zarr's sharding codec reads one chunk in ~6-10 ms through its async machinery (measured on the
# bench CPU); the same bytes decoded here take ~0.5 ms. The reader uses this path only for arrays
# whose zarr.json holds exactly the chain below (else it reads through Zarr), and verify always
# reads through Zarr, so the two implementations check each other.

_EMPTY = np.uint64(2**64 - 1)


_ZSTD = Zstd()


def decode_chunk(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """One chunk stored as bytes -> zstd -> crc32c: check the crc32c (last 4 bytes, little
    endian), decompress, view as little-endian `dtype` of `shape`."""
    if len(raw) < 4:
        raise ChunkError(f"Expected a chunk of at least 4 bytes, got {len(raw)}")
    body = raw[:-4]
    if google_crc32c.value(body).to_bytes(4, "little") != raw[-4:]:
        raise ChunkError("Expected the chunk's stored crc32c, got a different checksum")
    data = _ZSTD.decode(body)
    out = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
    if out.size != int(np.prod(shape)):
        raise ChunkError(f"Expected {int(np.prod(shape))} values in the chunk, got {out.size}")
    return out.reshape(shape)


def decode_shard_index(tail: bytes, n_chunks: int) -> np.ndarray:
    """The shard index (Zarr sharding spec, index at the end: (offset, nbytes) uint64 little
    endian per inner chunk, then crc32c) -> uint64 (n_chunks, 2); absent chunks are 2**64 - 1."""
    if len(tail) != n_chunks * 16 + 4:
        raise ChunkError(f"Expected a shard index of {n_chunks * 16 + 4} bytes, got {len(tail)}")
    if google_crc32c.value(tail[:-4]).to_bytes(4, "little") != tail[-4:]:
        raise ChunkError("Expected the shard index's stored crc32c, got a different checksum")
    return np.frombuffer(tail[:-4], dtype="<u8").reshape(n_chunks, 2)


def chunk_present(entry: np.ndarray) -> bool:
    return not (entry[0] == _EMPTY and entry[1] == _EMPTY)


def _is_inner_chain(codecs: Any) -> bool:
    names = [c.get("name") for c in codecs or []]
    if names != ["bytes", "zstd", "crc32c"]:
        return False
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    return endian == "little"


def direct_layout(meta: dict[str, Any]) -> str | None:
    """'sharded' or 'chunked' when an array's zarr.json uses exactly our chains (FORMAT.md), so
    the direct decoder applies; None otherwise (read through Zarr)."""
    codecs = meta.get("codecs") or []
    key_enc = meta.get("chunk_key_encoding") or {}
    if (
        key_enc.get("name") != "default"
        or (key_enc.get("configuration") or {}).get("separator", "/") != "/"
    ):
        return None
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0].get("configuration") or {}
        index = [c.get("name") for c in conf.get("index_codecs") or []]
        if (
            _is_inner_chain(conf.get("codecs"))
            and index == ["bytes", "crc32c"]
            and conf.get("index_location", "end") == "end"
        ):
            return "sharded"
        return None
    return "chunked" if _is_inner_chain(codecs) else None
