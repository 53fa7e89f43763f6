"""Frozen teachers: one loader per spec (`efficientnet-lite0`, `hf:`, `hf-vlm:`, `py:`).

teacher = load_teacher("efficientnet-lite0", ["4"])
feats = teacher(images)              # {"4": (B, 784, 40) float32}
teacher.layer_specs(), teacher.fingerprint()

Every teacher follows `TeacherProtocol` (base.py); `py:MODULE:FACTORY` plugs a user's own in
(plugin.py). Models are loaded honestly (featurecache.pipelines.model_loading): a teacher whose
weights do not all load is refused unless `allow_random_weights=True`.
"""

from __future__ import annotations

from collections.abc import Sequence

from featurecache.errors import OptionError
from featurecache.pipelines.model_loading import LoadOptions
from featurecache.pipelines.precompute.config import (
    DEFAULT_FRAME_REGION,
    FRAME_REGION_MODES,
    PREPROCESS_MODES,
    FrameRegionMode,
    PreprocessMode,
)
from featurecache.pipelines.precompute.teachers.base import (
    Teacher,
    TeacherProtocol,
    UnknownTeacherError,
    resample_tokens,
)
from featurecache.pipelines.precompute.teachers.efficientnet import EfficientNetLiteTeacher
from featurecache.pipelines.precompute.teachers.hf import HFVisionTeacher
from featurecache.pipelines.precompute.teachers.hf_vlm import HFVLMTeacher
from featurecache.pipelines.precompute.teachers.plugin import PluginTeacher

__all__ = [
    "TEACHER_SPECS",
    "Teacher",
    "TeacherProtocol",
    "UnknownTeacherError",
    "load_teacher",
    "resample_tokens",
]

TEACHER_SPECS = (
    "efficientnet-lite0[@R]",
    "hf:PATH_OR_ID",
    "hf-vlm:PATH_OR_ID",
    "py:MODULE:FACTORY",
)


def load_teacher(
    spec: str,
    layers: Sequence[str],
    *,
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_random_weights: bool = False,
    grid: tuple[int, int] | None = None,
    prompt: str | None = None,
    frame_region: FrameRegionMode = DEFAULT_FRAME_REGION,
    preprocess: PreprocessMode = "host",
) -> Teacher:
    """The teacher named by `spec`, frozen (eval, no grad) on `device`, returning `layers`.

    spec: "efficientnet-lite0" (or "efficientnet-lite0@R" for R px input), "hf:PATH_OR_ID" (a
    transformers vision backbone), "hf-vlm:PATH_OR_ID" (a VLM; `prompt` sets its instruction or
    whole prompt), "py:MODULE:FACTORY" (a user's teacher; runs their code).
    layers: layer names as strings ("4", "16", "final", "head"...). grid: (H, W) to resample
    patch grids to. trust_remote_code / allow_random_weights: see model_loading.LoadOptions.
    frame_region: "full" (the whole frame reaches the teacher: an hf processor's centre crop or
    letterbox is switched off) or "native" (the processor as saved); `teacher.frame_region(h, w)`
    reports the region of an h x w frame either way (featurecache.region.FrameRegion).
    preprocess: "host" (`teacher.preprocess` in the caller's threads) or "device" (uint8 frames
    in, resized and normalised on `device` where the teacher can: `Teacher.use_device_preprocess`;
    OptionError for an hf processor setting the device cannot replay).
    Raises UnknownTeacherError for an unknown spec, UnknownLayerError for a layer it lacks,
    IncompleteWeightsError for a checkpoint that does not cover the model.
    """
    spec = str(spec).strip()
    if frame_region not in FRAME_REGION_MODES:
        raise OptionError(f"Expected frame_region in {FRAME_REGION_MODES}, got {frame_region!r}.")
    if preprocess not in PREPROCESS_MODES:
        raise OptionError(f"Expected preprocess in {PREPROCESS_MODES}, got {preprocess!r}.")
    options = LoadOptions(
        allow_random_weights=allow_random_weights, trust_remote_code=trust_remote_code
    )
    teacher = _load(spec, layers, device, options, grid, prompt, frame_region)
    if preprocess == "device":
        teacher.use_device_preprocess()
    return teacher


def _load(
    spec: str,
    layers: Sequence[str],
    device: str,
    options: LoadOptions,
    grid: tuple[int, int] | None,
    prompt: str | None,
    frame_region: FrameRegionMode,
) -> Teacher:
    """The teacher of `spec` (see load_teacher)."""
    if spec.startswith("efficientnet-lite0"):
        return EfficientNetLiteTeacher(spec, layers, device=device, grid=grid)
    if spec.startswith("hf:") and len(spec) > 3:
        return HFVisionTeacher(
            spec, layers, device=device, options=options, grid=grid, frame_region=frame_region
        )
    if spec.startswith("hf-vlm:") and len(spec) > 7:
        return HFVLMTeacher(
            spec,
            layers,
            device=device,
            options=options,
            grid=grid,
            prompt=prompt,
            frame_region=frame_region,
        )
    if spec.startswith("py:") and len(spec) > 3:
        return PluginTeacher(spec, layers, device=device, grid=grid, frame_region=frame_region)
    raise UnknownTeacherError(f"Expected a teacher spec in {list(TEACHER_SPECS)}, got {spec!r}.")
