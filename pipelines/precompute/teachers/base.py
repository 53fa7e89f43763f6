"""The teacher protocol: a frozen model that maps images to per-layer token features.

Every teacher, built in or a user's plug-in (`py:package.module:factory`, see plugin.py), is
used through the same four members (`TeacherProtocol`):

    layers: tuple[str, ...]                       the layer names it returns, in order
    preprocess(images: list[PIL.Image]) -> batch  CPU, deterministic: a tensor, or an object
                                                  with `.to(device)` (a VLM's token batch)
    forward(batch) -> {layer: (B, tokens, dim)}   on the teacher's device, float32
    fingerprint() -> dict                         JSON-able: what the features depend on

A teacher also says which part of a frame reaches it: `frame_region(height, width)` ->
`featurecache.region.FrameRegion` (the whole frame, squashed, unless its preprocessing crops or
pads: an `hf:` processor's centre crop, a letterbox); the build records it per camera.

The build calls `prepare` (host side: `preprocess`) in decode threads and `forward` on the
model's device after `model_input` (the batch moved there with `.to(teacher.device)`), so
decoding overlaps the forward; `__call__` runs all three under `torch.inference_mode()`. With
`use_device_preprocess()` (`--preprocess device`) a built-in teacher whose recipe the device can
replay (`_device_recipe`, teachers/device_preprocess.py) prepares uint8 frames only and
`model_input` resizes and normalises them on the device; the others keep `preprocess` on the host.

`Teacher` is the base class of the built-in teachers. Its `fingerprint()` holds the identity
(kind, architecture), `weights`: the sha256 of every tensor the model runs with after loading
(`model_loading.tensors_sha256`: two different models never share it), the preprocessing as
applied, layers, output grid and dtype. The cache stores it and refuses to mix features of
different teachers; workers of one build must agree on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from featurecache.errors import FeatureCacheError, UnknownLayerError
from featurecache.pipelines.model_loading import tensors_sha256
from featurecache.pipelines.precompute.teachers.device_preprocess import (
    DevicePreprocess,
    FrameBatch,
)
from featurecache.pipelines.resample import resample_tokens
from featurecache.region import FrameRegion
from featurecache.spec import LayerSpec

__all__ = [
    "FINGERPRINT_VERSION",
    "PROBE_SIZE",
    "Teacher",
    "TeacherProtocol",
    "UnknownTeacherError",
    "check_layers",
    "resample_tokens",
]

FINGERPRINT_VERSION = 2  # 2: weights hash over every tensor run; preprocessing as applied
PROBE_SIZE = 64  # px of the blank image that measures layer specs when no frame is given


class UnknownTeacherError(FeatureCacheError):
    """A teacher spec that names no known teacher, or a model that cannot serve as one."""


@runtime_checkable
class TeacherProtocol(Protocol):
    """What the build needs of a teacher (built in or a `py:` plug-in)."""

    layers: tuple[str, ...]

    def preprocess(self, images: Sequence[Image.Image]) -> Any:
        """RGB PIL images -> the model's input batch on the CPU."""

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """The batch (on the teacher's device) -> {layer: (B, tokens, dim)} for every layer."""

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description of everything the features depend on."""


class Teacher(ABC):
    """A frozen teacher. Subclasses set `spec`, `layers`, `device`, `grid` and implement
    `preprocess`, `forward`, `_identity`, `_preprocessing` and `_module`.

    spec: the spec string it was loaded from (e.g. "efficientnet-lite0", "hf:/models/vit").
    layers: the layer names it returns, in the order asked for.
    grid: (H, W) to resample every layer's patch grid to, or None for the native grid.
    """

    spec: str
    layers: tuple[str, ...]
    device: torch.device
    grid: tuple[int, int] | None
    dtype: torch.dtype = torch.float32

    _layer_specs: tuple[LayerSpec, ...] | None = None
    _fingerprint: dict[str, Any] | None = None
    _on_device: DevicePreprocess | None = None  # set by use_device_preprocess

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> Any:
        """PIL images (any size, RGB) -> the model input on the CPU: (B, 3, H, W) float32, or a
        batch object with `.to(device)`."""

    @abstractmethod
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Model input (on the teacher's device) -> {layer: (B, tokens, dim) float32}. Callers
        wrap it in torch.inference_mode() (`__call__` does)."""

    @abstractmethod
    def _identity(self) -> dict[str, Any]:
        """What model this is, beyond its weights (kind, architecture, config highlights)."""

    @abstractmethod
    def _preprocessing(self) -> dict[str, Any]:
        """The preprocessing as applied, JSON-able (sizes, resample, mean, std, prompt...)."""

    @abstractmethod
    def _module(self) -> torch.nn.Module:
        """The torch module the features are computed with (hashed whole)."""

    def _device_recipe(self) -> DevicePreprocess | None:
        """This teacher's preprocessing as torch ops for its device, or None: it stays on the
        host (the base class; plug-ins, VLMs, NaFlex)."""
        return None

    def native_grid(self, layer: str) -> tuple[int, int] | None:
        """The layer's patch grid (h, w) before any resampling, as of the last forward (or a
        probe); None if its tokens are not one grid."""
        return None

    def frame_region(self, height: int, width: int) -> FrameRegion:
        """The region of a height x width frame this teacher's preprocessing lets through (see
        featurecache.region); the base class: the whole frame, squashed."""
        return FrameRegion.whole_frame(height, width, "squash")

    # ------------------------------------------------------------------ shared behaviour
    def use_device_preprocess(self) -> bool:
        """Run the resize and normalisation on the teacher's device from now on, where its
        recipe allows (`_device_recipe`); returns whether it does. Call before the first
        forward or fingerprint (load_teacher does): the fingerprint records it."""
        assert self._fingerprint is None and self._layer_specs is None, "call before use"
        self._on_device = self._device_recipe()
        return self._on_device is not None

    @property
    def preprocess_on_device(self) -> bool:
        """Whether `model_input` resizes and normalises on the device (uint8 frames in)."""
        return self._on_device is not None

    def prepare(self, images: Sequence[Image.Image]) -> Any:
        """Host side of the preprocessing (decode threads): `preprocess(images)`, or with device
        preprocessing the frames as uint8 (a FrameBatch, pinned when the device is CUDA)."""
        if self._on_device is None:
            return self.preprocess(images)
        return FrameBatch.stack(images, pin=self.device.type == "cuda")

    def model_input(self, batch: Any) -> Any:
        """Device side: `prepare`'s batch moved to the device (non_blocking from pinned frames)
        and, with device preprocessing, resized and normalised there: the forward's input."""
        if self._on_device is None:
            return batch.to(self.device)
        return self._on_device(batch.to(self.device, non_blocking=self.device.type == "cuda"))

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """prepare + model_input + forward under inference mode: {layer: (B, tokens, dim)
        float32}."""
        with torch.inference_mode():
            return self.forward(self.model_input(self.prepare(images)))

    def layer_specs(self, probe: Image.Image | None = None) -> tuple[LayerSpec, ...]:
        """(name, tokens, dim, grid) per layer, measured once by a forward of `probe` (a real
        frame: token counts of some families depend on the frame size) or of a blank
        PROBE_SIZE image."""
        if self._layer_specs is None:
            image = probe or Image.new("RGB", (PROBE_SIZE, PROBE_SIZE), (128, 128, 128))
            out = self([image])
            specs = []
            for name in self.layers:
                _, tokens, dim = out[name].shape
                grid = self.grid or self.native_grid(name)
                if grid is not None and grid[0] * grid[1] != tokens:
                    grid = None
                specs.append(LayerSpec(name, int(tokens), int(dim), grid))
            self._layer_specs = tuple(specs)
        return self._layer_specs

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the features this teacher writes (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = {
                "fingerprint_version": FINGERPRINT_VERSION,
                **self._identity(),
                "weights": tensors_sha256(self._module()),
                "preprocess": self._preprocessing_as_run(),
                "layers": list(self.layers),
                "grid": list(self.grid) if self.grid else None,
                "dtype": str(self.dtype).removeprefix("torch."),
            }
        return self._fingerprint

    def _preprocessing_as_run(self) -> dict[str, Any]:
        """`_preprocessing()`, plus with device preprocessing "device": how the device replays
        it (host and device caches never mix; host: unchanged, so earlier caches resume)."""
        if self._on_device is None:
            return self._preprocessing()
        return {**self._preprocessing(), "device": self._on_device.recipe}

    def _finish(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resample each layer to `grid` (when set) and cast to float32."""
        if self.grid is not None:
            for name, value in out.items():
                native = self.native_grid(name)
                if native is None:
                    raise UnknownLayerError(
                        f"Expected layer {name!r} of {self.spec} to be a patch grid for "
                        f"--grid {self.grid[0]}x{self.grid[1]}, got {value.shape[1]} tokens "
                        f"without a grid."
                    )
                out[name] = resample_tokens(value, native, self.grid)
        return {name: value.float() for name, value in out.items()}

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.spec!r}, layers={list(self.layers)}, device={self.device})"


def check_layers(spec: str, layers: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """The layer names as strings, each one of `known`; UnknownLayerError naming the teacher and
    the valid names otherwise (also for an empty or repeated list)."""
    names = tuple(str(x).strip() for x in layers)
    if not names:
        raise UnknownLayerError(f"Expected at least one layer of {spec}, got none.")
    if len(set(names)) != len(names):
        raise UnknownLayerError(f"Expected distinct layers of {spec}, got {list(names)}.")
    for name in names:
        if name not in known:
            shown = _compact(known)
            raise UnknownLayerError(f"Expected a layer of {spec} in {shown}, got {name!r}.")
    return names


def _compact(names: Sequence[str]) -> str:
    """'0..12' for a run of integer names (plus any named ones), else the list."""
    ints = [n for n in names if n.isdigit()]
    named = [n for n in names if not n.isdigit()]
    values = [int(n) for n in ints]
    if values and values == list(range(values[0], values[-1] + 1)):
        run = f"{values[0]}..{values[-1]}"
        return run if not named else f"{run} or {named}"
    return str(list(names))
