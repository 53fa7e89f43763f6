"""Honest loading: tiny saved ViT checkpoints, altered on disk, refused by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from featurecache.errors import RemoteCodeError
from featurecache.pipelines.model_loading import (
    IncompleteWeightsError,
    LoadOptions,
    ModelLoadError,
    load_config,
    load_pretrained,
    tensors_sha256,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _save_vit(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    transformers.ViTModel(config).save_pretrained(folder)
    return folder


def _rewrite(folder: Path, edit) -> None:
    file = folder / "model.safetensors"
    state = safetensors_torch.load_file(file)
    safetensors_torch.save_file(edit(state), file, metadata={"format": "pt"})


def test_clean_checkpoint_loads_and_hash_is_stable(tmp_path: Path) -> None:
    folder = _save_vit(tmp_path / "vit", seed=0)
    a = load_pretrained(transformers.AutoModel, folder, dtype=torch.float32)
    b = load_pretrained(transformers.AutoModel, folder, dtype=torch.float32)
    assert not a.training
    assert tensors_sha256(a) == tensors_sha256(b)


def test_two_random_models_two_hashes(tmp_path: Path) -> None:
    a = load_pretrained(transformers.AutoModel, _save_vit(tmp_path / "a", seed=0))
    b = load_pretrained(transformers.AutoModel, _save_vit(tmp_path / "b", seed=1))
    assert tensors_sha256(a) != tensors_sha256(b)


def test_renamed_tensors_are_refused_by_name(tmp_path: Path) -> None:
    folder = _save_vit(tmp_path / "vit", seed=0)
    _rewrite(folder, lambda s: {"renamed." + k: v for k, v in s.items()})
    with pytest.raises(IncompleteWeightsError) as err:
        load_pretrained(transformers.AutoModel, folder)
    text = str(err.value)
    assert "missing from the checkpoint" in text and "unexpected in the checkpoint" in text
    assert "renamed.embeddings.cls_token" in text and str(folder) in text
    assert "more" in text  # first few names, then a count


def test_one_missing_tensor_is_named(tmp_path: Path) -> None:
    folder = _save_vit(tmp_path / "vit", seed=0)
    _rewrite(folder, lambda s: {k: v for k, v in s.items() if k != "embeddings.cls_token"})
    with pytest.raises(IncompleteWeightsError, match=r"1 missing .*cls_token"):
        load_pretrained(transformers.AutoModel, folder)


def test_mismatched_shape_is_refused(tmp_path: Path) -> None:
    folder = _save_vit(tmp_path / "vit", seed=0)
    _rewrite(folder, lambda s: {**s, "embeddings.cls_token": torch.zeros(1, 1, 16)})
    with pytest.raises(IncompleteWeightsError, match=r"1 with another shape .*cls_token"):
        load_pretrained(transformers.AutoModel, folder)


def test_allow_random_weights_warns_and_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _save_vit(tmp_path / "vit", seed=0)
    _rewrite(folder, lambda s: {k: v for k, v in s.items() if k != "embeddings.cls_token"})
    with caplog.at_level(logging.WARNING):
        model = load_pretrained(
            transformers.AutoModel, folder, options=LoadOptions(allow_random_weights=True)
        )
    assert isinstance(model, torch.nn.Module)
    assert any("allow-random-weights" in r.getMessage() for r in caplog.records)


def test_unused_patterns_allow_unexpected_only(tmp_path: Path) -> None:
    folder = _save_vit(tmp_path / "vit", seed=0)
    _rewrite(folder, lambda s: {**s, "classifier.weight": torch.zeros(3, 32)})
    with pytest.raises(IncompleteWeightsError, match=r"classifier\.weight"):
        load_pretrained(transformers.AutoModel, folder)
    load_pretrained(transformers.AutoModel, folder, unused=[r"^classifier\."])


def test_remote_code_folder_needs_the_flag(tmp_path: Path) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "featurecache_never_known",
                "auto_map": {"AutoConfig": "custom.CustomConfig"},
            }
        )
    )
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        load_config(folder)
    assert not marker.exists()


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_config(tmp_path)
