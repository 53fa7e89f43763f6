"""Typed errors of the cache format. Every message says what was expected and what was found, and
names the file, key, layer or option at fault ("Expected X, got Y")."""

from __future__ import annotations


class FeatureCacheError(ValueError):
    """Base class of every error featurecache raises about its input or its files."""


class NotACacheError(FeatureCacheError):
    """The path is not a featurecache cache (no Zarr v3 group with `featurecache` attributes)."""


class FormatVersionError(FeatureCacheError):
    """The cache was written by a newer (or unknown) format version than this reader knows."""


class SpecMismatchError(FeatureCacheError):
    """An existing cache's spec, fingerprint or block plan differs from the one asked for."""


class UnknownLayerError(FeatureCacheError, KeyError):
    """A layer name that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownKeyError(FeatureCacheError, KeyError):
    """A sample key that no done block of the cache holds."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownBlockError(FeatureCacheError, IndexError):
    """A block index or row outside the cache's block table."""


class BlockNotDoneError(FeatureCacheError):
    """A key or block that belongs to a block not (yet) marked done."""


class BlockAlreadyDoneError(FeatureCacheError):
    """Asked to (re)write a block already marked done, without overwrite=True."""


class CorruptShardError(FeatureCacheError):
    """A shard file is missing, truncated or corrupted (a crc32c or checksum mismatch)."""


class ShapeMismatchError(FeatureCacheError):
    """Features whose shape or dtype does not match the layer's spec."""


class InvalidKeyError(FeatureCacheError):
    """A sample key that is empty, too long for `key_bytes`, holds NUL, or repeats another key."""


class InvalidFeaturesError(FeatureCacheError):
    """Feature values the cache cannot store faithfully (NaN, Inf, fp16 overflow)."""


class BlockCapacityError(FeatureCacheError):
    """More rows appended to a block than its planned capacity."""


__all__ = [
    "BlockAlreadyDoneError",
    "BlockCapacityError",
    "BlockNotDoneError",
    "CorruptShardError",
    "FeatureCacheError",
    "FormatVersionError",
    "InvalidFeaturesError",
    "InvalidKeyError",
    "NotACacheError",
    "ShapeMismatchError",
    "SpecMismatchError",
    "UnknownBlockError",
    "UnknownKeyError",
    "UnknownLayerError",
]
