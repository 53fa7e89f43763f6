"""Frozen teachers: one loader per spec (`hf:`, `hf-vlm:`, `efficientnet-lite0`).

teacher = load_teacher("efficientnet-lite0", ["4"])
feats = teacher(images)              # {"4": (B, 784, 40) float32}
teacher.layer_specs(), teacher.fingerprint()
"""

from __future__ import annotations

from collections.abc import Sequence

from featurecache.pipelines.build.teachers.base import Teacher, UnknownTeacherError, resample_tokens

__all__ = ["TEACHER_SPECS", "Teacher", "UnknownTeacherError", "load_teacher", "resample_tokens"]

TEACHER_SPECS = ("efficientnet-lite0[@R]", "hf:PATH_OR_ID", "hf-vlm:PATH_OR_ID")


def load_teacher(
    spec: str,
    layers: Sequence[str],
    *,
    device: str = "cpu",
    trust_remote_code: bool = False,
    grid: tuple[int, int] | None = None,
    prompt: str | None = None,
) -> Teacher:
    """The teacher named by `spec`, frozen (eval, no grad) on `device`, returning `layers`.

    spec: "efficientnet-lite0" (or "efficientnet-lite0@R" for R px input), "hf:PATH_OR_ID" (a
    transformers vision backbone), "hf-vlm:PATH_OR_ID" (a LLaVA VLM; `prompt` sets its prompt).
    layers: layer names as strings ("4", "16", "head"...). grid: (H, W) to resample patch grids to.
    Raises UnknownTeacherError for an unknown spec, UnknownLayerError for a layer it lacks.
    """
    spec = str(spec).strip()
    if spec.startswith("efficientnet-lite0"):
        from featurecache.pipelines.build.teachers.efficientnet import EfficientNetLiteTeacher

        return EfficientNetLiteTeacher(spec, layers, device=device, grid=grid)
    if spec.startswith("hf:") and len(spec) > 3:
        from featurecache.pipelines.build.teachers.hf import HFVisionTeacher

        return HFVisionTeacher(
            spec, layers, device=device, trust_remote_code=trust_remote_code, grid=grid
        )
    if spec.startswith("hf-vlm:") and len(spec) > 7:
        from featurecache.pipelines.build.teachers.hf_vlm import HFVLMTeacher

        return HFVLMTeacher(
            spec,
            layers,
            device=device,
            trust_remote_code=trust_remote_code,
            grid=grid,
            prompt=prompt,
        )
    raise UnknownTeacherError(f"Expected a teacher spec in {list(TEACHER_SPECS)}, got {spec!r}.")
