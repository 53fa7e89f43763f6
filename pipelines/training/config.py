"""`TrainConfig`: everything a training run depends on, validated on construction and saved as
RUN/config.json. The CLI's `featurecache train` options map onto its fields one to one."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from featurecache.pipelines.training.students.lora import DEFAULT_LORA_TARGETS, LoraSettings


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything a training run depends on; saved as RUN/config.json."""

    frames: tuple[str, ...]
    """Frame shards: tar files, globs, brace patterns or folders (samples.expand_frame_paths)."""
    out: str
    """The run folder (config.json, metrics.jsonl, checkpoint/, losses.png, summary.json)."""
    cache: str | None = None
    """The feature cache of the teacher targets. Needed when lambda_align > 0 unless
    resident_teacher is given."""
    student: str = "tiny-vla"
    """`tiny-vla`, `hf-vlm:PATH` (alias `hf-llava:PATH`) or `hf-pi0:PATH`."""
    student_options: dict[str, Any] = field(default_factory=dict)
    """Architecture options for load_student (tiny-vla: image_size, hidden_size, ...)."""
    lora_rank: int = 0
    """LoRA adapter rank for an HF student (peft); 0 = full fine-tuning. The paper: 32."""
    lora_alpha: float | None = None
    """LoRA scale numerator (update = alpha / rank * B A x); None: min(rank, 16), as released."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA adapters' input."""
    lora_targets: str = DEFAULT_LORA_TARGETS
    """Layers that get adapters: all-linear (as released), language-model, or names (q_proj,...)."""
    teacher_layer: str | None = None
    """The cache (or resident teacher) layer to align to; default: the cache's only layer."""
    align_layer: int | None = None
    """Student hidden_states index whose visual tokens are aligned; default: the middle layer."""
    lambda_align: float = 0.2
    """Weight of the alignment loss; 0 trains the plain action-only baseline."""
    loss: Literal["l1", "mse"] = "l1"
    """Action loss."""
    steps: int = 300
    """Optimizer steps in total (a resumed run continues up to this count)."""
    batch_size: int = 16
    """Samples per step and rank."""
    lr: float = 3e-4
    """AdamW learning rate (constant after warmup)."""
    warmup_steps: int = 10
    """Linear learning-rate warmup from 0."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    seed: int = 0
    """Seeds the student's and projector's init, the data order and dropout."""
    train_projector: bool = False
    """Train the projector (REPA) instead of keeping it frozen at its seeded init (released)."""
    projector_hidden: int | None = None
    """Projector hidden width; default: the student's (2048 for hf-llava, 256 for tiny-vla)."""
    resample: bool = False
    """Bilinearly resize the target token grid to the student's when they differ."""
    on_missing: Literal["error", "skip"] = "error"
    """A frame whose key the cache lacks: raise naming it, or skip it (counted, reported)."""
    on_mismatch: Literal["error", "skip"] = "error"
    """A frame whose image bytes differ from those its cache row was built from (the stored
    digest): raise naming the key and both sources, or skip it (counted with the missing)."""
    resident_teacher: str | None = None
    """Compute targets online with this teacher SPEC instead of the cache (comparison mode)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    resume: bool = False
    """Continue the run in `out` from its checkpoint."""
    num_workers: int = 0
    """DataLoader workers per rank for the stream."""
    shuffle_buffer: int = 256
    """Samples in the stream's shuffle buffer."""
    device: str = "auto"
    """"auto" (cuda:LOCAL_RANK when there is a GPU, else cpu), "cpu" or "cuda[:i]"."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    plot: bool = True
    """Write RUN/losses.png at the end."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN/tensorboard/ (beside metrics.jsonl)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the `wandb` package; refused before the work
    without it)."""
    wandb_project: str = "featurecache"
    """The W&B project of --wandb runs."""
    trust_remote_code: bool = False
    """Allow remote code for hf students/teachers (never by default)."""

    def __post_init__(self) -> None:
        if isinstance(self.frames, str):
            self.frames = (self.frames,)
        self.frames = tuple(str(f) for f in self.frames)
        if not self.frames:
            raise ValueError("The `frames` should name at least one frames pattern. Found none.")
        checks = [
            ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("lambda_align", self.lambda_align >= 0, ">= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("grad_clip", self.grad_clip >= 0, ">= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("shuffle_buffer", self.shuffle_buffer >= 1, ">= 1"),
            ("loss", self.loss in ("l1", "mse"), "l1|mse"),
            ("on_missing", self.on_missing in ("error", "skip"), "error|skip"),
            ("on_mismatch", self.on_mismatch in ("error", "skip"), "error|skip"),
        ]
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"The `{name}` should be {wanted}. Found {getattr(self, name)!r}.")
        if self.align_layer is not None and self.align_layer < 0:
            raise ValueError(f"The `align_layer` should be >= 0. Found {self.align_layer}.")
        if self.projector_hidden is not None and self.projector_hidden < 1:
            raise ValueError(
                f"The `projector_hidden` should be >= 1. Found {self.projector_hidden}."
            )
        if self.cache is not None and self.resident_teacher is not None:
            raise ValueError(
                "Give either `cache` (targets from the cache) or `resident_teacher` (targets "
                "computed online), not both. Found both."
            )
        if self.lambda_align > 0 and self.cache is None and self.resident_teacher is None:
            raise ValueError(
                f"The alignment loss (lambda {self.lambda_align}) needs targets: expected "
                f"--cache CACHE or --resident-teacher SPEC, found neither (or pass --lambda 0)."
            )
        if self.resident_teacher is not None and self.teacher_layer is None:
            raise ValueError("A `resident_teacher` needs a `teacher_layer`. Found None.")
        if self.train_projector and self.lambda_align == 0:
            raise ValueError("`train_projector` needs lambda_align > 0. Found lambda_align 0.")
        if self.lora_rank < 0:
            raise ValueError(f"The `lora_rank` should be >= 0. Found {self.lora_rank}.")
        self.lora_settings()  # validates the LoRA fields

    def lora_settings(self) -> LoraSettings | None:
        """The LoRA adapters asked for (lora_rank > 0), or None for full fine-tuning."""
        if self.lora_rank == 0:
            return None
        return LoraSettings(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            targets=self.lora_targets,
        )

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "frames" else v) for k, v in data.items() if k in known})
