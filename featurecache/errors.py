"""The error taxonomy: every error featurecache raises about its input, its files or its options
derives from `FeatureCacheError`, and every message follows one template:

    Expected <what was expected>, got <what was found> [in <file | key | option>][ (<what to do>)]

The CLI turns each class into one line and an exit status (featurecache/cli/main.py, the table
`EXIT_CODES`); `--debug` shows the traceback instead. Internal invariants use `assert`.

    FeatureCacheError (ValueError)
      OptionError              an option / config field out of range (non-finite, unknown, ...)
      SpecError                a CacheSpec / LayerSpec / Block / plan field that cannot be
        ShapeMismatchError     features whose shape or dtype does not match the layer's spec
      NotACacheError           not a featurecache cache at all
        ManifestError          a manifest field that is impossible or disagrees with the arrays
      FormatVersionError       written by a newer format version
      CorruptShardError        a shard / chunk file missing, truncated or failing its checksum
        ChunkError             a chunk or shard index that does not decode (no file named yet)
      DigestMismatchError      frames whose image bytes differ from the cache's stored digest
      FrameRegionError         a frame whose teacher-seen region the student cannot reproduce
      SpecMismatchError        an existing cache (or run) built with another spec / fingerprint
      CacheBusyError           another build is writing the cache right now
      StorageError             the file system refused (disk full, read-only, permission)
      UnsupportedURLError      a URL (s3://, gs://, http://) where a local path is expected
      RemoteCodeError          code from a model / run / data folder, without --trust-remote-code
      UserCodeError            the user's own code raised (a plug-in teacher, a data object)
      BadFrameError            one sample unusable as a frame (`--on-bad-frame skip` skips it)
      UnknownLayerError, UnknownKeyError, UnknownBlockError, BlockNotDoneError,
      BlockAlreadyDoneError, BlockConflictError, BlockCapacityError, InvalidKeyError,
      InvalidFeaturesError
"""

from __future__ import annotations


class FeatureCacheError(ValueError):
    """Base class of every error featurecache raises about its input, files or options."""


class OptionError(FeatureCacheError):
    """An option (CLI) or config field whose value is outside what it accepts; names it."""


class SpecError(FeatureCacheError):
    """A CacheSpec, LayerSpec, Block or block plan field with an impossible value."""


class ShapeMismatchError(SpecError):
    """Features (or a token grid) whose shape or dtype does not match the layer's spec."""


class NotACacheError(FeatureCacheError):
    """The path is not a featurecache cache (no Zarr v3 group with `featurecache` attributes)."""


class ManifestError(NotACacheError):
    """The manifest (zarr.json attributes) holds an impossible value, or one that disagrees with
    the arrays' own metadata (shape, dtype, chunking, sharding); names the field and the file."""


class FormatVersionError(FeatureCacheError):
    """The cache was written by a newer (or unknown) format version than this reader knows."""


class CorruptShardError(FeatureCacheError):
    """A shard file is missing, truncated or corrupted (a crc32c or checksum mismatch)."""


class ChunkError(CorruptShardError):
    """A chunk or shard index that does not decode (crc32c mismatch, truncation, absent); the
    reader re-raises it as a CorruptShardError naming the file, block and rows."""


class DigestMismatchError(FeatureCacheError):
    """A frame whose encoded image bytes differ from the digest the cache stored for its key:
    the frames are not the ones the cache was built from."""


class FrameRegionError(FeatureCacheError):
    """A frame whose region as the teacher saw it (featurecache.region) the student side cannot
    reproduce: a frame of another size than the recorded one, padding of an unknown colour, or a
    teacher preprocessing whose geometry is unknown."""


class SpecMismatchError(FeatureCacheError):
    """An existing cache's spec, fingerprint or block plan differs from the one asked for."""


class CacheBusyError(FeatureCacheError):
    """Another build holds the cache's build lock (two builds into one cache)."""


class StorageError(FeatureCacheError):
    """The file system refused a read or write (disk full, read-only, permission); names the
    path. What was written before stays valid (blocks are committed atomically)."""


class UnsupportedURLError(FeatureCacheError):
    """A URL (s3://, gs://, http://, ...) given where only a local path is supported."""


class RemoteCodeError(FeatureCacheError):
    """Running code from a model, run or data folder was needed but not allowed
    (pass --trust-remote-code on that command to allow it)."""


class UserCodeError(FeatureCacheError):
    """The user's own code failed (a plug-in teacher that raises or returns the wrong shape, a
    data object whose iteration raises): their message, naming the spec or object; the original
    exception is the `__cause__` (--debug shows its traceback)."""


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


class BadFrameError(FeatureCacheError):
    """One sample that cannot be used as a frame (no image, an undecodable image, a bad json or
    npy member, a missing camera). `--on-bad-frame skip` may skip these."""


class InvalidKeyError(FeatureCacheError):
    """A sample key that is empty, too long for `key_bytes`, holds NUL, or repeats another key."""


class InvalidFeaturesError(FeatureCacheError):
    """Feature values the cache cannot store faithfully (NaN, Inf, fp16 overflow)."""


class BlockConflictError(FeatureCacheError):
    """Two writers committed different results for one block (the second is refused)."""


class BlockCapacityError(FeatureCacheError):
    """More rows appended to a block than its planned capacity."""


__all__ = [
    "BadFrameError",
    "BlockAlreadyDoneError",
    "BlockCapacityError",
    "BlockConflictError",
    "BlockNotDoneError",
    "CacheBusyError",
    "ChunkError",
    "CorruptShardError",
    "DigestMismatchError",
    "FeatureCacheError",
    "FormatVersionError",
    "FrameRegionError",
    "InvalidFeaturesError",
    "InvalidKeyError",
    "ManifestError",
    "NotACacheError",
    "OptionError",
    "RemoteCodeError",
    "ShapeMismatchError",
    "SpecError",
    "SpecMismatchError",
    "StorageError",
    "UnknownBlockError",
    "UnknownKeyError",
    "UnknownLayerError",
    "UnsupportedURLError",
    "UserCodeError",
]
