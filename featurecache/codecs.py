"""Value codecs: fp16 cast, int8 quantization per token, and per token x per channel. Quantization
happens here, in the writer, never inside Zarr: a plain Zarr v3 reader gets int8 values and
float32 scales and multiplies them itself (docs/FORMAT.md). The bytes of the chunks the values
are stored in (the Zarr codec chain) are `featurecache.chunk_codec`'s.

int8 (per token, i.e. per (row, token) vector over `dim`):
    scale = max_d |x_d| / 127                   float32, 0 for an all-zero token
    q_d   = clip(round_half_even(x_d / scale), -127, 127)   int8 (0 where scale == 0)
    x_d  ~= q_d * scale                         |error| <= scale / 2 per element

int8c (int8 of the channel-equalised token y_d = x_d / c_d, c the layer's channel scale (dim,)):
    scale = max_d |y_d| / 127
    q_d   = clip(round_half_even(y_d / scale), -127, 127)
    x_d  ~= q_d * scale * c_d                   |error| <= scale * c_d / 2 per element
A channel that is large in every token (a "massive activation" channel of a ViT) gets a large c_d,
so it no longer sets the token's scale and coarsens every other channel. Values are never
clipped, whatever c is: a poorly calibrated c only moves resolution between channels.

Calibration (`calibrate_channel_scale`) picks c from a sample of the layer's tokens: with
m_d = max over tokens of |x_d| / rms(x) (each token normalised by its RMS, so high-norm tokens do
not dominate), floored at the median channel, c = (m / median m) ** alpha, alpha the smallest
candidate in CALIBRATION_ALPHAS whose mean squared relative error on the sample itself meets
CALIBRATION_ERROR_GOAL, or the one with the least error when none does. alpha = 0 (c = 1, plain
int8) comes first: where int8 is good enough int8c is int8 (same codes, same bytes), and on its
calibration sample int8c is never worse than int8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from featurecache.errors import InvalidFeaturesError
from featurecache.format import INT8_LEVELS

if TYPE_CHECKING:
    import torch

CALIBRATION_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # candidate strengths of the equalisation
# Mean |x - x_hat|^2 / |x|^2 (~ 2 * (1 - cos)) a candidate must reach on the sample to be taken:
# 1e-4 ~ mean cosine 0.99995, half the 0.9999 budget. Equalising costs entropy (the int8 codes
# use their range fully: ~2-15 % more bytes after zstd, measured in benchmarks/cache.py), so it
# is spent only where plain int8 misses this.
CALIBRATION_ERROR_GOAL = 1e-4
CALIBRATION_TOKENS = 16384  # tokens of the sample used (8k-16k: calibration < 1 s at dim 1024)


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


def quantize_int8(
    x: np.ndarray, channel_scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """x float (n, tokens, dim) -> (q int8 (n, tokens, dim), scale float32 (n, tokens)).

    With `channel_scale` c float32 (dim,), positive (int8c), the token x / c is quantized:
    x ~= q * scale[..., None] * c."""
    x = np.asarray(x, dtype=np.float32)
    if channel_scale is not None:
        x = x / np.asarray(channel_scale, dtype=np.float32)
    absmax = np.abs(x).max(axis=-1)
    scale = (absmax / np.float32(INT8_LEVELS)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.rint(x / safe[..., None])
    np.clip(q, -INT8_LEVELS, INT8_LEVELS, out=q)
    return q.astype(np.int8), scale


def quantize_int8_torch(
    x: torch.Tensor, channel_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8` in torch, on x's device (the teacher's: a build sends back int8 + scales,
    a quarter of float32's bytes), bit-identical to the numpy function: every step is an IEEE
    float32 operation with the same operands. Each division is by a tensor on the device, never
    by a Python or CPU scalar: CUDA divides by a scalar as a multiplication by its reciprocal,
    which rounds differently. x: float (n, tokens, dim) (any float dtype: cast to float32 first,
    as the numpy path does); channel_scale: float32 (dim,) or None -> (q int8 (n, tokens, dim),
    scale float32 (n, tokens)), both on x's device."""
    import torch

    x = x.float()
    if channel_scale is not None:
        x = x / channel_scale.to(device=x.device, dtype=torch.float32)
    absmax = x.abs().amax(dim=-1)  # (n, tokens); NaN propagates, as numpy's max
    scale = absmax / torch.full_like(absmax, float(INT8_LEVELS))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(-1))  # round half to even, as np.rint
    q = q.clamp_(-INT8_LEVELS, INT8_LEVELS)
    return q.to(torch.int8), scale


@dataclass(frozen=True, slots=True)
class EncodedFeatures:
    """One layer's features already encoded as stored (on the teacher's device, by
    `encode_torch`), for `BlockWriter.append`: values int8 (int8/int8c) or float16 (fp16)
    (n, tokens, dim) and scales float32 (n, tokens) for int8/int8c (None for fp16)."""

    values: np.ndarray
    scales: np.ndarray | None


def encode_on_device(
    x: torch.Tensor, codec: str, channel_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's features x float (n, tokens, dim) encoded for `codec`, left on x's device:
    (values float16 or int8 (n, tokens, dim), scales float32 (n, tokens) or None for fp16).
    fp16: a cast (as numpy's astype: round to nearest even, out of range -> inf, which the writer
    refuses); int8 / int8c: `quantize_int8_torch`."""
    if codec == "fp16":
        return x.float().half(), None
    return quantize_int8_torch(x, channel_scale if codec == "int8c" else None)


def encode_torch(
    x: torch.Tensor, codec: str, channel_scale: torch.Tensor | None = None
) -> EncodedFeatures:
    """`encode_on_device`, brought to the host. Equal, byte for byte, to the writer's numpy
    encoding of x.float()."""
    values, scales = encode_on_device(x, codec, channel_scale)
    return EncodedFeatures(values.cpu().numpy(), None if scales is None else scales.cpu().numpy())


def dequantize_int8(
    q: np.ndarray, scale: np.ndarray, channel_scale: np.ndarray | None = None
) -> np.ndarray:
    """q int8 (..., tokens, dim), scale float32 (..., tokens), optional channel_scale float32
    (dim,) (int8c) -> float32 (..., tokens, dim) = q * scale[..., None] (* channel_scale)."""
    x = q.astype(np.float32) * scale.astype(np.float32)[..., None]
    if channel_scale is not None:
        x *= np.asarray(channel_scale, dtype=np.float32)
    return x


def _relative_error(x: np.ndarray, channel_scale: np.ndarray | None) -> float:
    """Mean over tokens of |x - x_hat|^2 / |x|^2 (about 2 * mean(1 - cos)) for x (n, dim)."""
    q, scale = quantize_int8(x[:, None, :], channel_scale)
    err = dequantize_int8(q, scale, channel_scale)[:, 0, :].astype(np.float64) - x
    norm2 = np.einsum("nd,nd->n", x, x)
    keep = norm2 > 0
    return (
        float((np.einsum("nd,nd->n", err, err)[keep] / norm2[keep]).mean()) if keep.any() else 0.0
    )


def calibrate_channel_scale(x: Any, *, max_tokens: int = CALIBRATION_TOKENS) -> np.ndarray:
    """The int8c channel scale c, float32 (dim,), finite, >= 1 (at least half the channels are
    1), from a sample of a layer's features x (..., dim) (e.g. the first frames' teacher output,
    (n, tokens, dim)).

    See the module docstring for the rule. At most `max_tokens` tokens are used (an even stride
    over the sample). Deterministic: the same sample gives the same bits. All-zero samples give
    c = 1."""
    x = to_numpy_float(x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise InvalidFeaturesError(f"Expected calibration features (..., dim), got {x.shape}")
    tokens = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    if len(tokens) > max_tokens:
        tokens = tokens[:: -(-len(tokens) // max_tokens)]
    if not np.isfinite(tokens).all():
        raise InvalidFeaturesError("Expected finite calibration features, got NaN or Inf")
    rms = np.sqrt((tokens * tokens).mean(axis=-1, keepdims=True))
    live = rms[:, 0] > 0
    ones = np.ones(x.shape[-1], np.float32)
    if not live.any():
        return ones
    m = np.abs(tokens[live] / rms[live]).max(axis=0)  # (dim,) per-channel peak, RMS units
    median = float(np.median(m))
    if not median > 0:  # most channels never fire in the sample: nothing to equalise safely
        return ones
    m = np.maximum(m, median) / median  # >= 1: channels are only ever attenuated
    sample = tokens[live]
    best, best_err = ones, np.inf
    for alpha in CALIBRATION_ALPHAS:  # increasing: the least equalisation that meets the goal
        c = ones if alpha == 0 else (m**alpha).astype(np.float32)
        err = _relative_error(sample, None if alpha == 0 else c)
        if err <= CALIBRATION_ERROR_GOAL:
            return c
        if err < best_err:
            best, best_err = c, err
    return best


def check_channel_scale(c: Any, dim: int, where: str) -> np.ndarray:
    """A channel scale as float32 (dim,), or InvalidFeaturesError naming `where` when it is not
    (dim,), not finite or not positive."""
    arr = to_numpy_float(c)
    if arr.shape != (dim,) or arr.dtype.kind not in "fiu":
        raise InvalidFeaturesError(
            f"Expected a channel scale of shape ({dim},) for {where}, got "
            f"{arr.dtype} {tuple(arr.shape)}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not (np.isfinite(arr).all() and (arr > 0).all()):
        raise InvalidFeaturesError(
            f"Expected finite, positive channel scale values for {where}, got min "
            f"{float(np.nanmin(arr)) if arr.size else 'none'} (NaN/Inf: "
            f"{int((~np.isfinite(arr)).sum())})"
        )
    return arr
