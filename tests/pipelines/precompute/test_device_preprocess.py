"""`--preprocess device`: every teacher kind's device replay against its host preprocessing, on
real sample frames (72 px PNGs shrunk and 24 px PNGs enlarged to the tiny models' 32 px, and
frames already at 32 px), the features of both paths, fingerprints, and what stays on the host.
The "device" here is the CPU's torch: the same code a GPU runs (the CUDA-only parts:
test_host_copies.py, gpu marker).

Measured (CPU, these frames): the device input differs from the host's by at most one 8-bit step
(one step = rescale / std after normalising) on 0.2 % of the values for bilinear teachers
(efficientnet-lite0, ViT, DINOv3), none for the bicubic ones; 64 -> 224 px gave 2 steps on
~2 % (bilinear): the bound asserted is 2 steps on <= 3 %. Frames already at the model's size
give bit-identical inputs; features agree to a per-token cosine >= 0.99998.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.errors import OptionError, ShapeMismatchError
from featurecache.pipelines.demo.sample_data import write_sample_data
from featurecache.pipelines.precompute.teachers import load_teacher
from featurecache.pipelines.precompute.teachers.device_preprocess import (
    DevicePreprocess,
    FrameBatch,
)
from featurecache.samples import decode_image, iter_samples

from .tiny_teachers import save_tiny_teacher

transformers = pytest.importorskip("transformers")

STEPS = 2  # the bound, in 8-bit steps
MAX_DIFFERING = 0.03  # fraction of the input's values that may differ at all
# One 8-bit step after rescale + normalise, per teacher: rescale / (smallest std), written from
# each family's documented mean/std (not read from featurecache's tables).
STEP = {
    "efficientnet-lite0@32": 1 / 128,
    "vit": (1 / 255) / 0.5,
    "siglip": (1 / 255) / 0.5,
    "dinov2": (1 / 255) / 0.224,
    "dinov2_with_registers": (1 / 255) / 0.224,
    "dinov3_vit": (1 / 255) / 0.224,
    "clip": (1 / 255) / 0.26130258,
    "radio": 1 / 255,
}
KINDS = [  # (teacher kind, frame_region): the two regions where a saved processor crops
    ("efficientnet-lite0@32", "full"),
    ("vit", "full"),
    ("siglip", "full"),
    ("dinov2", "full"),
    ("dinov2", "native"),  # shortest_edge 32 + centre crop 32, replayed
    ("dinov2_with_registers", "full"),  # no saved processor: the family's convention
    ("dinov3_vit", "full"),  # a torchvision-only processor, replayed with PIL on the host
    ("clip", "native"),
    ("radio", "full"),  # torch ops already: moved to the device
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    """8 sample frames: 6 of 72 x 72 px, 2 of 24 x 24 px (decoded from their PNGs); the tests
    that stack them take them one size at a time or through the device's grouping."""
    out = []
    for size, n in ((72, 6), (24, 2)):
        root = tmp_path_factory.mktemp(f"frames{size}")
        write_sample_data(root, frames=n, shard_size=n, image_size=size, seed=5, split="train")
        out += [decode_image(*s.image()) for p in root.glob("*.tar") for s in iter_samples(p)]
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Teacher spec per kind: the tiny saved hf models, and efficientnet-lite0 at 32 px."""
    root = tmp_path_factory.mktemp("device-teachers")
    specs = {"efficientnet-lite0@32": "efficientnet-lite0@32"}
    for kind, _ in KINDS:
        if kind not in specs:
            specs[kind] = f"hf:{save_tiny_teacher(kind, root / kind)}"
    return specs


def _layers(spec: str) -> list[str]:
    return ["4"] if spec.startswith("efficientnet") else ["1", "final"]


def _pair(spec: str, frame_region: str):
    host = load_teacher(spec, _layers(spec), frame_region=frame_region)
    device = load_teacher(spec, _layers(spec), frame_region=frame_region, preprocess="device")
    assert device.preprocess_on_device and not host.preprocess_on_device
    return host, device


def _inputs(teacher, images: list[Image.Image]) -> torch.Tensor:
    with torch.inference_mode():
        x = teacher.model_input(teacher.prepare(images))
    return x if torch.is_tensor(x) else x["pixel_values"]


@pytest.mark.parametrize(("kind", "frame_region"), KINDS)
def test_device_input_matches_host_input(models, images, kind, frame_region) -> None:
    host, device = _pair(models[kind], frame_region)
    a, b = _inputs(host, images), _inputs(device, images)
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    diff = (a - b).abs()
    assert diff.max().item() <= STEPS * STEP[kind] * (1 + 1e-5), diff.max().item() / STEP[kind]
    assert (diff > 0).float().mean().item() <= MAX_DIFFERING
    # frames already at the model's input size: no resize, bit-identical inputs
    sized = [im.resize(tuple(a.shape[-2:][::-1]), Image.BILINEAR) for im in images]
    assert torch.equal(_inputs(host, sized), _inputs(device, sized))


@pytest.mark.parametrize(("kind", "frame_region"), KINDS)
def test_device_features_match_host_features(models, images, kind, frame_region) -> None:
    host, device = _pair(models[kind], frame_region)
    with torch.inference_mode():
        a, b = host(images), device(images)
    for layer in a:
        cos = torch.nn.functional.cosine_similarity(a[layer], b[layer], dim=-1)  # (B, tokens)
        assert cos.min().item() > 0.999, (layer, cos.min().item())


def test_fingerprints_record_where_preprocessing_ran(models) -> None:
    for kind in ("efficientnet-lite0@32", "dinov2", "radio"):
        host, device = _pair(models[kind], "full")
        fh, fd = host.fingerprint(), device.fingerprint()
        assert fh != fd
        assert "device" not in fh["preprocess"]  # host: as every earlier build recorded it
        recipe = fd["preprocess"].pop("device")
        assert fd == fh  # the rest is the same teacher
        assert recipe["frames"] == "uint8 (B, H, W, 3)"
    resize = _pair(models["dinov2"], "full")[1].fingerprint()["preprocess"]["device"]["resize"]
    assert "bicubic, antialias=True" in resize


def test_mixed_frame_sizes_are_grouped_in_batch_order(models, images) -> None:
    host, device = _pair(models["vit"], "full")
    mixed = [im if i % 2 else im.resize((80, 60), Image.BILINEAR) for i, im in enumerate(images)]
    batch = device.prepare(mixed)
    assert (
        isinstance(batch, FrameBatch) and len(batch.groups) == 3 and len(batch) == 8
    )  # 80x60, 72, 24
    together = _inputs(device, mixed)
    one_by_one = torch.cat([_inputs(device, [im]) for im in mixed])
    assert torch.equal(together, one_by_one)
    diff = (together - _inputs(host, mixed)).abs().max().item()
    assert diff <= STEPS * STEP["vit"] * (1 + 1e-5)


def test_mixed_sizes_that_end_at_different_sizes_are_refused() -> None:
    recipe = DevicePreprocess(
        table=torch.zeros(3, 256), size=lambda h, w: (h // 2, w // 2), recipe={}
    )
    frames = [Image.new("RGB", (64, 64)), Image.new("RGB", (32, 64))]
    with pytest.raises(ShapeMismatchError, match="one input size"):
        recipe(FrameBatch.stack(frames))


def _processor(**overrides):
    kwargs = {"size": {"height": 32, "width": 32}, **overrides}
    return transformers.ViTImageProcessorPil(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"resample": Image.Resampling.LANCZOS}, "got LANCZOS"),
        ({"resample": Image.Resampling.BOX}, "got BOX"),
        ({"do_pad": True, "pad_size": {"height": 40, "width": 40}}, "got do_pad True"),
    ],
)
def test_settings_the_device_cannot_replay_are_named(overrides, named) -> None:
    with pytest.raises(OptionError, match=named):
        DevicePreprocess.from_image_processor(_processor(**overrides), where="hf:/m")


def test_a_processor_outside_the_pil_backend_is_refused() -> None:
    class Own(transformers.ViTImageProcessorPil):
        def resize(self, image, size, resample=None, **kwargs):  # its own geometry
            return image

    with pytest.raises(OptionError, match=r"Own \(its own resize"):
        DevicePreprocess.from_image_processor(Own(size={"height": 8, "width": 8}), where="x")


def test_nearest_and_no_rescale_replay_the_processor(images) -> None:
    processor = _processor(resample=Image.Resampling.NEAREST, do_rescale=False, image_mean=0.0)
    recipe = DevicePreprocess.from_image_processor(processor, where="x")
    host = torch.from_numpy(np.stack(processor(images=images)["pixel_values"]))
    got = recipe(FrameBatch.stack(images))
    assert (got - host).abs().max().item() <= STEPS / 0.5  # pixels 0..255 over std 0.5


def test_naflex_and_plugins_keep_host_preprocessing(tmp_path, images) -> None:
    naflex = f"hf:{save_tiny_teacher('siglip2', tmp_path / 'siglip2')}"
    plugin = tmp_path / "mine.py"
    plugin.write_text(
        "import numpy as np, torch\n"
        "class Mine:\n"
        "    def __init__(self, layers, device):\n"
        "        self.layers, self.device = list(layers), device\n"
        "    def preprocess(self, images):\n"
        "        return torch.from_numpy(np.stack([np.asarray(im) for im in images])).float()\n"
        "    def forward(self, batch):\n"
        "        return {'x': batch.flatten(1, 2)[:, :16]}\n"
        "    def fingerprint(self):\n"
        "        return {'model': 'mine'}\n"
    )
    for spec, layers in ((naflex, ["1"]), (f"py:{plugin}:Mine", ["x"])):
        host = load_teacher(spec, layers)
        device = load_teacher(spec, layers, preprocess="device")
        assert not device.preprocess_on_device
        assert device.fingerprint() == host.fingerprint()
        with torch.inference_mode():
            a, b = host(images[:2]), device(images[:2])
        assert all(torch.equal(a[k], b[k]) for k in a)
