"""The on-disk format's names: the format version, every array and group path, codecs and
dtypes, block statuses, the digest rule (`sample_digest`) and the per-shard file layout.
docs/FORMAT.md is the prose version of this module. The typed spec of a cache lives in
`featurecache.spec` (LayerSpec, CacheSpec), its block table and version-1 manifest in
`featurecache.manifest`, the version-2 completion records in `featurecache.completion`.

A cache is a Zarr v3 group:
    zarr.json                  group metadata; attributes["featurecache"] is the manifest
    keys                       uint8 (rows, key_bytes): UTF-8 sample key, NUL-padded
    digests                    uint8 (rows, 16): each row's `sample_digest` (version 2)
    features/<layer>           float16 or int8 (rows, tokens, dim), chunk (1, tokens, dim),
                               shard (shard_rows, tokens, dim)
    scales/<layer>             float32 (rows, tokens), int8 and int8c: x ~= q * scale
    channel_scales/<layer>     float32 (dim,), int8c only: x ~= q * scale * channel_scale
    views/<i>/features/<layer> view i >= 1 of every row (version 3, caches built with --views V):
    views/<i>/scales/<layer>   laid out exactly as features/<layer> and scales/<layer>
    views/<i>/params           float64 (rows, cameras, VIEW_PARAM_FIELDS): view i's transform
    featurecache.lock          empty file, fcntl lock for manifest updates (not part of Zarr)
    featurecache.build.lock    fcntl lock held by the build writing the cache; says who (not Zarr)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Literal

from featurecache.errors import SpecError

if TYPE_CHECKING:  # the spec module imports this one; only the annotations need CacheSpec
    from featurecache.spec import CacheSpec

# Bump on any change an older reader would misread. 2: the int8c codec (channel_scales arrays)
# and the per-row source digest. 3: cached augmented views (views/<i>/..., the header's "views"
# and "augment"). Readers read every version from 1 up to this one.
FORMAT_VERSION: Final = 3
ATTRS_KEY: Final = "featurecache"  # group attribute holding the manifest
GROUP_METADATA: Final = "zarr.json"
LOCK_FILE: Final = "featurecache.lock"
BUILD_LOCK_FILE: Final = "featurecache.build.lock"  # held (flock) by the one build writing
KEYS_ARRAY: Final = "keys"
# digests: uint8 (rows, DIGEST_BYTES), `sample_digest` of each row's source images; all zero for
# a row whose source had no encoded image bytes (Python frames). Since format version 2.
DIGESTS_ARRAY: Final = "digests"
DIGEST_BYTES: Final = 16
DIGEST_DTYPE: Final = "uint8"
DIGESTS_SINCE_VERSION: Final = 2
FEATURES_GROUP: Final = "features"
SCALES_GROUP: Final = "scales"
CHANNEL_SCALES_GROUP: Final = "channel_scales"
# Cached augmented views (FORMAT.md "Views"): view 0 is the frame itself (features/, scales/);
# view i >= 1 lives under views/<i>/ with the same arrays plus its transform's parameters.
VIEWS_GROUP: Final = "views"
VIEWS_SINCE_VERSION: Final = 3
VIEW_PARAMS: Final = "params"
VIEW_PARAM_DTYPE: Final = "float64"
# One row of views/<i>/params per camera, in this order (featurecache.view_params.ViewParams):
# the crop box in frame pixels (left, top, width, height), flip (0/1, horizontal), the rotation
# angle in degrees (counter-clockwise), brightness (additive offset on [0, 1] intensities),
# contrast, saturation (factors) and hue (a fraction of a turn).
VIEW_PARAM_FIELDS: Final = (
    "left", "top", "width", "height", "flip", "angle", "brightness", "contrast", "saturation",
    "hue",
)  # fmt: skip

CODECS: Final = ("fp16", "int8", "int8c")
Codec = Literal["fp16", "int8", "int8c"]
FEATURE_DTYPE: Final = {"fp16": "float16", "int8": "int8", "int8c": "int8"}
SCALED_CODECS: Final = ("int8", "int8c")  # codecs with per-token scales/<layer>
CHANNEL_SCALED_CODECS: Final = ("int8c",)  # codecs with a per-channel channel_scales/<layer>
CODEC_SINCE_VERSION: Final = {"fp16": 1, "int8": 1, "int8c": 2}  # first format version with it
# The build's default: int8c meets the fidelity targets on every feature kind benchmarks/cache.py
# measures (int8 misses them with outlier channels) and equals int8 where int8 is good enough.
DEFAULT_CODEC: Final = "int8c"
SCALE_DTYPE: Final = "float32"
KEY_DTYPE: Final = "uint8"
INT8_LEVELS: Final = 127  # q = round(x / scale), scale = absmax / 127, q in [-127, 127]
# The compressor inside every chunk's chain (featurecache.chunk_codec): "zstd:L" (level L in
# ZSTD_LEVELS) or "none" (bytes -> crc32c). The header's optional "compressor" field; absent:
# DEFAULT_COMPRESSOR, the one chain of caches written before the field (fp16 with zstd vs
# blosc+shuffle: the same ratio, measured).
COMPRESSOR_NONE: Final = "none"
DEFAULT_COMPRESSOR: Final = "zstd:3"
ZSTD_LEVELS: Final = range(1, 23)
_ZSTD_COMPRESSOR = re.compile(r"zstd:([1-9][0-9]?)")

DEFAULT_SHARD_ROWS: Final = 64
DEFAULT_KEY_BYTES: Final = 128
CHECKSUM_PREFIX: Final = "sha256:"

STATUS_PENDING: Final = "pending"
STATUS_DONE: Final = "done"
STATUSES: Final = (STATUS_PENDING, STATUS_DONE)
Status = Literal["pending", "done"]


def compressor_level(compressor: str, what: str = "compressor") -> int | None:
    """The zstd level a compressor name stands for: "zstd:L" -> L (1 <= L <= 22), "none" -> None;
    SpecError naming `what` for anything else (the canonical spelling only: "zstd:3", not
    "zstd:03")."""
    match = _ZSTD_COMPRESSOR.fullmatch(compressor) if isinstance(compressor, str) else None
    if compressor == COMPRESSOR_NONE:
        return None
    if match is None or int(match.group(1)) not in ZSTD_LEVELS:
        raise SpecError(
            f"Expected {what} 'none' or 'zstd:L' with L in {ZSTD_LEVELS.start}.."
            f"{ZSTD_LEVELS.stop - 1}, got {compressor!r}"
        )
    return int(match.group(1))


def camera_layer(camera: str, layer: str) -> str:
    """The cache layer name of teacher layer `layer` seen through `camera` ("" = single camera):
    "16" or "top/16"."""
    return f"{camera}/{layer}" if camera else str(layer)


def view_prefix(view: int) -> str:
    """The group holding view `view`'s arrays: "" for view 0 (the frame), "views/<i>/" after."""
    return f"{VIEWS_GROUP}/{view}/" if view else ""


def features_path(layer: str, view: int = 0) -> str:
    """Zarr path of a layer's feature array (of view `view`: FORMAT.md "Views")."""
    return f"{view_prefix(view)}{FEATURES_GROUP}/{layer}"


def scales_path(layer: str, view: int = 0) -> str:
    """Zarr path of a layer's per-token scale array (int8, int8c), of view `view`."""
    return f"{view_prefix(view)}{SCALES_GROUP}/{layer}"


def view_params_path(view: int) -> str:
    """Zarr path of view `view`'s (>= 1) parameters: float64 (rows, cameras, fields)."""
    return f"{view_prefix(view)}{VIEW_PARAMS}"


def channel_scales_path(layer: str) -> str:
    """Zarr path of a layer's per-channel scale vector (int8c): float32 (dim,)."""
    return f"{CHANNEL_SCALES_GROUP}/{layer}"


def sample_digest(images: Mapping[str, bytes]) -> bytes:
    """The content digest of one source sample (FORMAT.md "Digests"): its encoded image bytes
    {camera: bytes} ("" for a single plain image) -> DIGEST_BYTES bytes. One image: the first 16
    bytes of its SHA-256; several cameras: the first 16 bytes of the SHA-256 of their digests
    concatenated in sorted camera order. SHA-256: hardware-accelerated on current x86 and ARM CPUs
    (measured ~2x faster than BLAKE2b here), and in every standard library."""
    if not images:
        raise SpecError("Expected at least one image to digest, got none")
    parts = [hashlib.sha256(images[c]).digest()[:DIGEST_BYTES] for c in sorted(images)]
    if len(parts) == 1:
        return parts[0]
    return hashlib.sha256(b"".join(parts)).digest()[:DIGEST_BYTES]


def cache_cameras(spec: CacheSpec) -> tuple[str, ...]:
    """The cameras a cache's layers were computed from, sorted ("" for single-camera caches):
    the prefixes of camera_layer names."""
    return tuple(sorted({name.rpartition("/")[0] for name in spec.layer_names}))


def array_ndim(array_path: str) -> int:
    """Dimensions of a per-row array: 3 for features/<layer> (row, token, dim) and a view's
    params (row, camera, field), 2 for keys, digests and scales/<layer> (of any view)."""
    if array_path.startswith(f"{VIEWS_GROUP}/"):
        array_path = array_path.split("/", 2)[2]  # views/<i>/features/... -> features/...
    return 3 if array_path.startswith(f"{FEATURES_GROUP}/") or array_path == VIEW_PARAMS else 2


def shard_file(array_path: str, ndim: int, shard_index: int) -> str:
    """Relative file path of a shard (or, for keys/scales, of a chunk of shard_rows rows):
    default chunk key encoding with "/" separator, e.g. `features/4/c/3/0/0`."""
    return "/".join([array_path, "c", str(shard_index)] + ["0"] * (ndim - 1))


def checksum_arrays(spec: CacheSpec, version: int = FORMAT_VERSION) -> list[str]:
    """The per-shard arrays a block checksum covers, in hashing order: keys, digests (format
    version >= 2), then per layer (spec order) features and, for int8/int8c, scales; then for
    each view i >= 1 (caches with views) its params and its arrays in the same order. For int8c
    the stream starts with the `channel_scale_arrays` (see FORMAT.md "Block checksum")."""
    arrays = [KEYS_ARRAY]
    if version >= DIGESTS_SINCE_VERSION:
        arrays.append(DIGESTS_ARRAY)
    for view in range(spec.views):
        if view:
            arrays.append(view_params_path(view))
        for layer in spec.layer_names:
            arrays.append(features_path(layer, view))
            if spec.codec in SCALED_CODECS:
                arrays.append(scales_path(layer, view))
    return arrays


def channel_scale_arrays(spec: CacheSpec) -> list[str]:
    """The per-layer channel scale vectors (int8c; none for other codecs), in spec order: written
    once when the cache is created, hashed at the start of every block checksum."""
    if spec.codec not in CHANNEL_SCALED_CODECS:
        return []
    return [channel_scales_path(layer) for layer in spec.layer_names]
