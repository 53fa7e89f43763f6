"""VLA students (`tiny-vla`, `hf-vlm:PATH` alias `hf-llava:PATH`, `hf-pi0:PATH`), LoRA for the
HF ones, and the alignment projector."""

from featurecache.pipelines.training.students.base import (
    ACTION_DIM,
    ByteTokenizer,
    Student,
    StudentOutput,
)
from featurecache.pipelines.training.students.loader import load_student, parse_student_spec
from featurecache.pipelines.training.students.lora import (
    LoraSettings,
    ParameterCounts,
    parameter_counts,
)
from featurecache.pipelines.training.students.projector import (
    DEFAULT_PROJECTOR_HIDDEN,
    AlignmentProjector,
    build_projector,
)

__all__ = [
    "ACTION_DIM",
    "DEFAULT_PROJECTOR_HIDDEN",
    "AlignmentProjector",
    "ByteTokenizer",
    "LoraSettings",
    "ParameterCounts",
    "Student",
    "StudentOutput",
    "build_projector",
    "load_student",
    "parameter_counts",
    "parse_student_spec",
]
