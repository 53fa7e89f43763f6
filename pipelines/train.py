"""Fine-tune a VLA student on robot actions with visual representation alignment (PAPER.md),
against teacher targets read from a feature cache: no teacher in memory.

    loss = action_loss(student(image, instruction), action)                  # L1 (or MSE)
         + lambda * cosine_alignment_loss(projector(h_k[visual]), target)    # 1 - cos, mean

`h_k[visual]` are the student's hidden states at `--align-layer` k at the visual-token positions
(B, T, d); `target` is the cached teacher layer (B, T, D), int8 (+ per-token scales, which cancel
in the cosine, so the loss reads the int8 values directly) or fp16. `--resident-teacher SPEC`
computes the targets online with the teacher instead (the comparison mode the cache replaces).

Read `train()` top to bottom: set-up (process group, student, targets, projector, optimizer,
resume), then the loop (stream -> forward -> loss -> backward -> step -> log -> checkpoint),
then the wrap-up (last checkpoint, plot, summary). The run folder RUN holds config.json,
metrics.jsonl (one line per step), checkpoint/ (the latest), losses.png and summary.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from featurecache.pipelines.stream import Batch, StreamConfig, check_shards_per_rank, iter_batches
from featurecache.pipelines.students import Student, build_projector, load_student

CHECKPOINT_DIR = "checkpoint"
MODEL_FILE = "model.safetensors"  # student.* and projector.* weights
OPTIMIZER_FILE = "optimizer.pt"  # torch.save of the optimizer state (tensors and numbers only)
STATE_FILE = "state.json"  # step, data position per rank, seed, counters


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything a training run depends on; saved as RUN/config.json."""

    frames: tuple[str, ...]
    """Frame shards: tar files, globs, brace patterns or folders (frames.expand_frame_paths)."""
    out: str
    """The run folder (config.json, metrics.jsonl, checkpoint/, losses.png, summary.json)."""
    cache: str | None = None
    """The feature cache of the teacher targets. Needed when lambda_align > 0 unless
    resident_teacher is given."""
    student: str = "tiny-vla"
    """`tiny-vla` or `hf-llava:PATH`."""
    student_options: dict[str, Any] = field(default_factory=dict)
    """Architecture options for load_student (tiny-vla: image_size, hidden_size, ...)."""
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

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "frames" else v) for k, v in data.items() if k in known})


@dataclass(slots=True)
class TrainSummary:
    """What a run did. losses: the last step's {loss, action_loss, align_loss}."""

    run: str
    steps: int
    samples: int
    missing: int
    seconds: float
    samples_per_s: float
    losses: dict[str, float]
    teacher_layer: str | None
    align_layer: int
    target_grid: tuple[int, int] | None
    student_grid: tuple[int, int]


# --- targets: where the teacher's tokens come from ---------------------------------------------


@dataclass(slots=True)
class TargetSpec:
    """The teacher layer the projector maps to: name, token count, width, grid (or None)."""

    layer: str
    tokens: int
    dim: int
    grid: tuple[int, int] | None
    fingerprint: dict[str, Any]


def cache_target_spec(cache: Any, layer: str | None) -> TargetSpec:
    """The layer of an open cache to align to (its only layer when `layer` is None)."""
    from featurecache.errors import UnknownLayerError

    names = [spec.name for spec in cache.spec.layers]
    if layer is None:
        if len(names) != 1:
            raise UnknownLayerError(
                f"Expected --teacher-layer to pick one of the cache's layers {names}, got none."
            )
        layer = names[0]
    if layer not in names:
        raise UnknownLayerError(
            f"Expected --teacher-layer to be one of the cache's layers {names}, got {layer!r}."
        )
    spec = cache.spec.layer(layer)
    grid = tuple(spec.grid) if spec.grid else None
    return TargetSpec(layer, spec.tokens, spec.dim, grid, dict(cache.spec.fingerprint))


def check_targets_fit(target: TargetSpec, student: Student, resample: bool) -> None:
    """Refuse (before the first step) a target layer whose tokens cannot meet the student's."""
    from featurecache.errors import ShapeMismatchError

    want = student.num_visual_tokens
    if target.tokens == want:
        return
    rows, cols = student.visual_grid
    if not resample:
        raise ShapeMismatchError(
            f"Expected teacher layer {target.layer!r} with {want} tokens (the student's "
            f"{rows}x{cols} visual grid), got {target.tokens} tokens (grid {target.grid}). "
            f"Pass --resample to resize the target grid bilinearly, or build the cache at an "
            f"image size that gives a {rows}x{cols} grid."
        )
    if target.grid is None or target.grid[0] * target.grid[1] != target.tokens:
        raise ShapeMismatchError(
            f"Expected teacher layer {target.layer!r} to have a token grid for --resample, got "
            f"grid {target.grid} for {target.tokens} tokens."
        )


def dequantize(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Stored targets -> float32 (B, T, D): int8 * per-token scale (B, T), or fp16 upcast."""
    if scales is None:
        return values.float()
    return values.float() * scales.float().unsqueeze(-1)


def resample_grid(
    target: torch.Tensor, grid: tuple[int, int], out: tuple[int, int]
) -> torch.Tensor:
    """(B, h*w, D) float on grid (h, w) -> (B, H*W, D) on grid `out`, bilinear."""
    b, _, d = target.shape
    x = target.reshape(b, grid[0], grid[1], d).permute(0, 3, 1, 2)  # (B, D, h, w)
    x = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(b, out[0] * out[1], d)


class _Aligned(nn.Module):
    """Student + projector as one module (what DDP wraps).

    forward -> actions (B, 7), projected visual tokens (B, T, D) or None."""

    def __init__(self, student: Student, projector: nn.Module, align_layer: int) -> None:
        super().__init__()
        self.student, self.projector, self.align_layer = student, projector, align_layer

    def forward(
        self, images: torch.Tensor, instructions: list[str], project: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.student(images, instructions, self.align_layer)
        return out.actions, (self.projector(out.visual) if project else None)


# --- distributed set-up ------------------------------------------------------------------------


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def _all_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:  # sync point: every rank waits here once per step (logging only)
        torch.distributed.all_reduce(values)
        values /= world
    return values


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(
    run: Path,
    model: _Aligned,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rank: int,
    world: int,
) -> None:
    """Write RUN/checkpoint atomically: every rank writes its RNG state, rank 0 the rest."""
    from safetensors.torch import save_file

    tmp, final = run / (CHECKPOINT_DIR + ".tmp"), run / CHECKPOINT_DIR
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-{rank}.pt")
    if rank == 0:
        weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    _barrier(world)
    if rank == 0:
        old = run / (CHECKPOINT_DIR + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(world)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"Expected checkpoint {path} to hold this model's weights, got missing "
            f"{missing[:5]} and unexpected {unexpected[:5]}."
        )


@dataclass(slots=True)
class LoadedRun:
    """A trained run, ready for inference: student + projector in eval mode."""

    config: TrainConfig
    student: Student
    projector: nn.Module
    align_layer: int
    target: TargetSpec | None


def load_run(run: str | Path, device: str = "cpu") -> LoadedRun:
    """Rebuild a run's student and projector from RUN/config.json and RUN/checkpoint."""
    run = Path(run)
    ckpt = run / CHECKPOINT_DIR
    if not (ckpt / STATE_FILE).is_file():
        raise FileNotFoundError(f"Expected a trained run with {ckpt / STATE_FILE}, found none.")
    config = TrainConfig.from_json(json.loads((run / "config.json").read_text()))
    state = json.loads((ckpt / STATE_FILE).read_text())
    student = load_student(
        config.student,
        seed=config.seed,
        trust_remote_code=config.trust_remote_code,
        **config.student_options,
    )
    target = TargetSpec(**state["target"]) if state.get("target") else None
    projector = build_projector(
        student.hidden_size,
        target.dim if target else 1,
        hidden=state["projector_hidden"],
        seed=config.seed + 1,
    )
    model = _Aligned(student, projector, state["align_layer"])
    load_weights(model, ckpt / MODEL_FILE)
    model.to(device).eval()
    return LoadedRun(config, student, projector, state["align_layer"], target)


# --- the run -----------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainSummary:
    """Run (or resume) the training described by `config`; see the module docstring."""
    from featurecache.pipelines.build.frames import expand_frame_paths

    rank, world, device = _init_distributed(config.device)
    run = Path(config.out)
    shards = expand_frame_paths(config.frames)
    check_shards_per_rank(shards, world, config.num_workers)
    if (run / CHECKPOINT_DIR).exists() and not config.resume:
        raise FileExistsError(
            f"Expected a new run folder, got {run} with a checkpoint: pass --resume to continue "
            f"it or choose another --out."
        )

    # The student (identical init on every rank: its own seeded generator).
    student = load_student(
        config.student,
        seed=config.seed,
        trust_remote_code=config.trust_remote_code,
        **config.student_options,
    )
    align_layer = student.default_align_layer if config.align_layer is None else config.align_layer
    student.check_align_layer(align_layer)

    # The targets: a cache (no teacher anywhere in this process), a resident teacher, or none.
    cache, teacher, target = None, None, None
    if config.cache is not None:
        from featurecache.reader import open_cache

        cache = open_cache(config.cache)
        target = cache_target_spec(cache, config.teacher_layer)
    elif config.resident_teacher is not None:
        from featurecache.pipelines.teachers import load_teacher

        assert config.teacher_layer is not None
        teacher = load_teacher(
            config.resident_teacher,
            [config.teacher_layer],
            device=str(device),
            trust_remote_code=config.trust_remote_code,
        )
        (spec,) = teacher.layer_specs()
        grid = tuple(spec.grid) if spec.grid else None
        target = TargetSpec(spec.name, spec.tokens, spec.dim, grid, teacher.fingerprint())
    if target is not None:
        check_targets_fit(target, student, config.resample)  # refuse before the first step

    # The projector: student width -> teacher width, frozen at a seeded init unless trained.
    hidden = config.projector_hidden or student.default_projector_hidden
    projector = build_projector(
        student.hidden_size,
        target.dim if target else 1,
        hidden=hidden,
        seed=config.seed + 1,
        trainable=config.train_projector,
    )
    model = _Aligned(student, projector, align_layer).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    # Resume: weights, optimizer, step, data position, RNG; otherwise a fresh run folder.
    step, samples, missing = 0, 0, 0
    position = {"epoch": 0, "batches": 0}  # this rank's place in the stream
    torch.manual_seed(config.seed * 1000 + rank)  # dropout differs per rank, reproducibly
    ckpt = run / CHECKPOINT_DIR
    if config.resume and (ckpt / STATE_FILE).is_file():
        state = json.loads((ckpt / STATE_FILE).read_text())
        _check_resumable(state, config, target, align_layer, hidden, world)
        load_weights(model, ckpt / MODEL_FILE)
        optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, weights_only=True))
        rng = torch.load(ckpt / f"rng-{rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        step, samples, missing = state["step"], state["samples"], state["missing"]
        position = state["positions"][rank]
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(config.to_json(), indent=2))
        _truncate_metrics(run / "metrics.jsonl", step)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(  # type: ignore[assignment]
            model, find_unused_parameters=not isinstance(student, _tiny_vla_type())
        )
    core: _Aligned = model.module if world > 1 else model  # type: ignore[assignment]

    def state_now() -> dict[str, Any]:
        return {
            "step": step,
            "samples": samples,
            "missing": missing,
            "seed": config.seed,
            "positions": _gather(position, world),
            "align_layer": align_layer,
            "projector_hidden": hidden,
            "world_size": world,
            "target": asdict(target) if target else None,
        }

    action_loss_fn = F.l1_loss if config.loss == "l1" else F.mse_loss
    project = target is not None and config.lambda_align > 0
    bar = _progress(config, step, rank)
    metrics = (run / "metrics.jsonl").open("a") if rank == 0 else None
    last: dict[str, float] = {}
    started, start_step = time.perf_counter(), step
    model.train()
    while step < config.steps:
        stream = StreamConfig(
            shards=shards,
            image_size=student.image_size,
            batch_size=config.batch_size,
            cache=config.cache if project else None,
            layer=target.layer if (project and cache is not None) else None,
            seed=config.seed,
            epoch=position["epoch"],
            shuffle_buffer=config.shuffle_buffer,
            on_missing=config.on_missing,
            keep_images=teacher is not None,
            skip_batches=position["batches"],
            num_workers=config.num_workers,
        )
        got_any = position["batches"] > 0  # a resume may start at the end of an epoch
        tick = time.perf_counter()
        for batch in iter_batches(stream):
            missing += len(batch.missing)
            if not len(batch):
                continue
            got_any = True
            position["batches"] += 1
            images = batch.images.to(device, non_blocking=True)  # (B, 3, S, S)
            actions = batch.actions.to(device, non_blocking=True)  # (B, 7)

            # forward: actions (B, 7), projected visual tokens (B, T, D)
            lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            pred, projected = model(images, batch.instructions, project)
            action_loss = action_loss_fn(pred, actions)
            if project:
                assert projected is not None and target is not None
                goal = _targets(batch, teacher, target, core.student, config.resample, device)
                # lambda goes into the kernel as its weight: dS comes out already scaled, so the
                # backward hands it on without another pass over (B, T, D)
                weighted = _alignment_loss(projected, goal, config.lambda_align)
                loss = action_loss + weighted
                align_loss = weighted.detach() / config.lambda_align  # 1 - cos, for the logs
            else:
                align_loss = torch.zeros((), device=device)
                loss = action_loss

            # backward and step (DDP all-reduces the gradients inside backward)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step += 1
            samples += len(batch) * world

            # log: loss parts averaged over ranks (one small all-reduce per step)
            parts = torch.stack([loss.detach(), action_loss.detach(), align_loss.detach()])
            parts = _all_mean(parts.float(), world).tolist()
            last = {"loss": parts[0], "action_loss": parts[1], "align_loss": parts[2]}
            elapsed = time.perf_counter() - started
            rate = (step - start_step) * config.batch_size * world / max(elapsed, 1e-9)
            if metrics is not None:
                row = {"step": step, **last, "lr": lr, "epoch": position["epoch"]}
                row |= {"step_s": time.perf_counter() - tick}  # data wait + compute
                row |= {"samples": samples, "samples_per_s": rate, "missing": missing}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(act=f"{parts[1]:.4f}", align=f"{parts[2]:.4f}", sps=f"{rate:.1f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint(run, core, optimizer, state_now(), rank, world)
            if step >= config.steps:
                break
            tick = time.perf_counter()
        else:  # the epoch ended: the next one reshuffles shards and samples
            if not got_any:
                raise ValueError(
                    f"Expected rank {rank} to read samples from its shards, got an empty "
                    f"epoch {position['epoch']} (all frames missing from the cache?)."
                )
            position = {"epoch": position["epoch"] + 1, "batches": 0}

    # Wrap-up: the last checkpoint (what evaluate loads), the plot, the summary.
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    save_checkpoint(run, core, optimizer, state_now(), rank, world)
    seconds = time.perf_counter() - started
    summary = TrainSummary(
        run=str(run),
        steps=step,
        samples=samples,
        missing=missing,
        seconds=seconds,
        samples_per_s=(step - start_step) * config.batch_size * world / max(seconds, 1e-9),
        losses=last,
        teacher_layer=target.layer if target else None,
        align_layer=align_layer,
        target_grid=target.grid if target else None,
        student_grid=student.visual_grid,
    )
    if rank == 0:
        if config.plot:
            plot_losses(run / "metrics.jsonl", run / "losses.png")
        (run / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
        if missing:
            print(f"Skipped {missing} frame(s) the cache lacks (--on-missing skip).")
    return summary


def _tiny_vla_type() -> type:
    from featurecache.pipelines.students.tiny_vla import TinyVLA

    return TinyVLA


def _targets(
    batch: Batch,
    teacher: Any,
    target: TargetSpec,
    student: Student,
    resample: bool,
    device: torch.device,
) -> torch.Tensor:
    """The batch's teacher tokens on `device`, shaped like the projected student tokens.

    Cached: as stored (int8, whose per-token scales cancel in the cosine, or fp16), unless the
    grid must be resampled (then dequantized to float32 first). Resident: the teacher's forward.
    """
    if teacher is not None:
        with torch.inference_mode():
            values = teacher(batch.images_pil)[target.layer]  # (B, T, D) float32
        values, scales = values.clone().to(device), None
    else:
        assert batch.target is not None
        values = batch.target.to(device, non_blocking=True)  # (B, T, D) int8 | float16
        scales = None if batch.scales is None else batch.scales.to(device)
    if target.tokens != student.num_visual_tokens and resample:
        assert target.grid is not None
        return resample_grid(dequantize(values, scales), target.grid, student.visual_grid)
    return values


def _alignment_loss(projected: torch.Tensor, goal: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * (1 - cos), averaged over tokens: featurecache.kernels (Triton on GPU, torch on
    CPU). projected (B, T, D) float; goal (B, T, D) int8 | float16 | float32, as stored."""
    from featurecache.kernels import cosine_alignment_loss

    if goal.dtype != torch.int8 and goal.dtype != projected.dtype:
        goal = goal.to(projected.dtype)
    return cosine_alignment_loss(projected, goal, weight=weight)


def _check_resumable(
    state: dict[str, Any],
    config: TrainConfig,
    target: TargetSpec | None,
    align_layer: int,
    hidden: int,
    world: int,
) -> None:
    from featurecache.errors import SpecMismatchError

    saved = state.get("target")
    now = asdict(target) if target else None
    pairs = [
        ("align layer", state["align_layer"], align_layer),
        ("projector hidden", state["projector_hidden"], hidden),
        ("world size", state["world_size"], world),
        ("target layer/tokens/width/grid", _shape(saved), _shape(now)),
        ("teacher fingerprint", (saved or {}).get("fingerprint"), (now or {}).get("fingerprint")),
    ]
    for what, before, after in pairs:
        if before != after:
            raise SpecMismatchError(
                f"Expected the resumed run's {what} to be {before!r} (as checkpointed), got "
                f"{after!r}."
            )


def _shape(target: dict[str, Any] | None) -> Any:
    if target is None:
        return None
    grid = target["grid"]
    return (target["layer"], target["tokens"], target["dim"], tuple(grid) if grid else None)


def _gather(position: dict[str, int], world: int) -> list[dict[str, int]]:
    if world == 1:
        return [dict(position)]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, dict(position))
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows after `step` (left by a run that stopped after its last checkpoint)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _progress(config: TrainConfig, step: int, rank: int) -> Any:
    if rank != 0 or not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out: Path) -> None:
    """A PNG of the total, action and alignment losses per step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(steps, [r["action_loss"] for r in rows], label="action")
    axes[0].plot(steps, [r["loss"] for r in rows], label="total", alpha=0.6)
    axes[1].plot(steps, [r["align_loss"] for r in rows], color="C2", label="align (1 - cos)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    if not any(math.isfinite(r["align_loss"]) and r["align_loss"] for r in rows):
        axes[1].set_title("no alignment (lambda 0)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
