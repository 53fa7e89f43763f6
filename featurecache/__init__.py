"""featurecache: compute a frozen teacher's features once, train against them forever."""

from featurecache.errors import (
    BlockAlreadyDoneError,
    BlockCapacityError,
    BlockNotDoneError,
    CorruptShardError,
    FeatureCacheError,
    FormatVersionError,
    InvalidFeaturesError,
    InvalidKeyError,
    NotACacheError,
    ShapeMismatchError,
    SpecMismatchError,
    UnknownKeyError,
    UnknownLayerError,
)
from featurecache.format import Block, CacheSpec, LayerSpec, Manifest, plan_blocks
from featurecache.reader import FeatureCache, open_cache
from featurecache.writer import BlockResult, BlockWriter, CacheWriter, create_cache, open_writer

__all__ = [
    "Block",
    "BlockAlreadyDoneError",
    "BlockCapacityError",
    "BlockNotDoneError",
    "BlockResult",
    "BlockWriter",
    "CacheSpec",
    "CacheWriter",
    "CorruptShardError",
    "FeatureCache",
    "FeatureCacheError",
    "FormatVersionError",
    "InvalidFeaturesError",
    "InvalidKeyError",
    "LayerSpec",
    "Manifest",
    "NotACacheError",
    "ShapeMismatchError",
    "SpecMismatchError",
    "UnknownKeyError",
    "UnknownLayerError",
    "create_cache",
    "open_cache",
    "open_writer",
    "plan_blocks",
]
