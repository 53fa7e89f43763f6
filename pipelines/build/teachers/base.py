"""The teacher protocol: a frozen model that maps images to per-layer token features.

Every teacher turns a list of PIL images into `{layer: (B, tokens, dim) float32}` in two steps,
`preprocess` (PIL -> one input tensor, CPU, deterministic) and `forward` (tensor -> features, on
the teacher's device); `__call__` runs both under `torch.inference_mode()`. The build job calls
them separately so decoding and preprocessing overlap the forward.

A teacher's `fingerprint()` names what it computes: identity (kind, architecture), the sha256 of
its weights (state_dict tensors, name-sorted: name, dtype, shape, bytes), preprocessing, layers,
output grid and dtype. The cache stores it and refuses to mix features of different teachers.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from PIL import Image

from featurecache.errors import FeatureCacheError, UnknownLayerError
from featurecache.format import LayerSpec
from featurecache.pipelines.resample import resample_tokens

__all__ = [
    "FINGERPRINT_VERSION",
    "Teacher",
    "UnknownTeacherError",
    "resample_tokens",
    "weights_sha256",
]

FINGERPRINT_VERSION = 1  # bump when a teacher's features change for the same weights/options


class UnknownTeacherError(FeatureCacheError):
    """A teacher spec that names no known teacher, or a model that cannot serve as one."""


def weights_sha256(module: torch.nn.Module, *, skip: Iterable[str] = ()) -> str:
    """sha256 over the state_dict (parameters and buffers), tensors in name order: for each, the
    name, dtype, shape and raw bytes of the contiguous CPU copy. Same weights -> same hash, on any
    device; "sha256:<hex>". `skip`: names left out (e.g. heads a checkpoint lacks, which loading
    initializes at random and the features never use)."""
    digest = hashlib.sha256()
    state = module.state_dict()
    skipped = set(skip)
    for name in sorted(set(state) - skipped):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


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

    _hash_skip: tuple[str, ...] = ()  # state_dict names left out of the weights hash
    _layer_specs: tuple[LayerSpec, ...] | None = None
    _fingerprint: dict[str, Any] | None = None

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any size, RGB) -> the model input, (B, 3, H, W) float32 on the CPU."""

    @abstractmethod
    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model input (B, 3, H, W) -> {layer: (B, tokens, dim) float32} on the teacher's device.
        Callers wrap it in torch.inference_mode() (`__call__` does)."""

    @abstractmethod
    def _identity(self) -> dict[str, Any]:
        """What model this is, beyond its weights (kind, architecture, config highlights)."""

    @abstractmethod
    def _preprocessing(self) -> dict[str, Any]:
        """The preprocessing, JSON-able (sizes, resample, mean, std, prompt...)."""

    @abstractmethod
    def _module(self) -> torch.nn.Module:
        """The torch module whose weights define the teacher (for the weights hash)."""

    def native_grid(self, layer: str) -> tuple[int, int] | None:
        """The layer's patch grid (h, w) before any resampling; None if not a grid."""
        return None

    # ------------------------------------------------------------------ shared behaviour
    def __call__(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """preprocess + forward under inference mode: {layer: (B, tokens, dim) float32}."""
        with torch.inference_mode():
            return self.forward(self.preprocess(images).to(self.device))

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """(name, tokens, dim, grid) per layer, measured once by a forward of one blank image."""
        if self._layer_specs is None:
            out = self([Image.new("RGB", (64, 64), (128, 128, 128))])
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
                "weights": weights_sha256(self._module(), skip=self._hash_skip),
                "preprocess": self._preprocessing(),
                "layers": list(self.layers),
                "grid": list(self.grid) if self.grid else None,
                "dtype": str(self.dtype).removeprefix("torch."),
            }
        return self._fingerprint

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
    """'0..12' for a run of integer names, else the list."""
    if names and all(n.isdigit() for n in names):
        ints = [int(n) for n in names]
        if ints == list(range(ints[0], ints[-1] + 1)):
            return f"{ints[0]}..{ints[-1]}"
    return str(list(names))
