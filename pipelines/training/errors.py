"""The training wing's errors: runs, checkpoints and the loss. Each derives from the taxonomy of
`featurecache.errors` (so the CLI's one handler turns it into one line and an exit status) and
says what was expected, what was found, which file or option is at fault and what to do."""

from __future__ import annotations

from featurecache.errors import FeatureCacheError, SpecMismatchError


class RunExistsError(FeatureCacheError):
    """--out names a folder that already holds a run, and --resume was not given."""


class RunNotFoundError(FeatureCacheError):
    """A RUN folder without a trained run in it (no checkpoint/state.json or config.json)."""


class ResumeMismatchError(SpecMismatchError):
    """`train --resume` with an option whose value differs from the run's (config.json)."""


class CheckpointError(FeatureCacheError):
    """A checkpoint file that does not load (truncated, corrupt) or does not fit the model (a
    different model size)."""


class EmptyEpochError(FeatureCacheError):
    """An epoch with nothing to train on: every frame of a rank's shards was skipped (the cache
    lacks its key, or holds another image's targets under it), or the shards hold no frames."""


class NonFiniteLossError(FeatureCacheError):
    """The loss became NaN or infinite at a step; the last good checkpoint is kept."""


__all__ = [
    "CheckpointError",
    "EmptyEpochError",
    "NonFiniteLossError",
    "ResumeMismatchError",
    "RunExistsError",
    "RunNotFoundError",
]
