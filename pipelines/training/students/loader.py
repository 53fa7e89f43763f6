"""`load_student(spec)`: a student from its spec string."""

from __future__ import annotations

from typing import Any

from featurecache.pipelines.training.students.base import Student

STUDENT_SPECS = ("tiny-vla", "hf-llava:PATH")


def parse_student_spec(spec: str) -> tuple[str, str | None]:
    """'tiny-vla' -> ('tiny-vla', None); 'hf-llava:/ckpt' -> ('hf-llava', '/ckpt')."""
    if spec == "tiny-vla":
        return "tiny-vla", None
    if spec.startswith("hf-llava:") and len(spec) > len("hf-llava:"):
        return "hf-llava", spec[len("hf-llava:") :]
    raise ValueError(
        f"The `--student` should be one of {', '.join(STUDENT_SPECS)}. Found {spec!r}."
    )


def load_student(
    spec: str, *, seed: int = 0, trust_remote_code: bool = False, **options: Any
) -> Student:
    """Build the student named by `spec` (weights seeded by `seed` where randomly initialised).

    tiny-vla options: see `TINY_VLA_DEFAULTS` (image_size, hidden_size, num_layers, ...).
    hf-llava options: dtype ("float32", "bfloat16", ...).
    """
    kind, path = parse_student_spec(spec)
    if kind == "tiny-vla":
        from featurecache.pipelines.training.students.tiny_vla import TinyVLA

        return TinyVLA(seed=seed, **options)
    from featurecache.pipelines.training.students.hf_llava import HFLlava

    assert path is not None
    return HFLlava(path, seed=seed, trust_remote_code=trust_remote_code, **options)
