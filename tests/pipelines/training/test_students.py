"""Students (tiny-vla; the HF ones in test_students_hf.py / test_pi0.py) and the alignment
projector."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featurecache.errors import OptionError
from featurecache.pipelines.training.students import (
    AlignmentProjector,
    ByteTokenizer,
    build_projector,
    load_student,
    parse_student_spec,
)

from ._train_helpers import TINY_OPTIONS, one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def test_projector_is_the_papers_mlp() -> None:
    p = AlignmentProjector(4096, 1024)
    kinds = [type(m) for m in p.net]
    assert kinds == [
        nn.LayerNorm, nn.Linear, nn.SiLU, nn.Dropout, nn.Linear, nn.SiLU, nn.Dropout, nn.Linear
    ]  # fmt: skip
    assert (p.net[1].in_features, p.net[1].out_features) == (4096, 2048)
    assert (p.net[4].in_features, p.net[4].out_features) == (2048, 2048)
    assert (p.net[7].in_features, p.net[7].out_features) == (2048, 1024)
    assert p.net[3].p == p.net[6].p == 0.1


def test_projector_seeded_frozen_by_default_and_independent_of_global_rng() -> None:
    torch.manual_seed(123)
    a = build_projector(16, 8, hidden=32, seed=7)
    torch.manual_seed(456)
    b = build_projector(16, 8, hidden=32, seed=7)
    c = build_projector(16, 8, hidden=32, seed=8)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb) and not pa.requires_grad
    assert not torch.equal(a.net[1].weight, c.net[1].weight)
    assert all(
        p.requires_grad for p in build_projector(16, 8, hidden=32, trainable=True).parameters()
    )
    with pytest.raises(OptionError, match=r"projector's dropout in \[0, 1\), got 1.5"):
        AlignmentProjector(4, 4, dropout=1.5)


@pytest.mark.parametrize(
    ("widths", "named"),
    [((0, 4, 8), "in_dim >= 1, got 0 (from the student's"),
     ((4, -1, 8), "out_dim >= 1, got -1 (from the teacher"),
     ((4, 4, 0), "hidden >= 1, got 0 (from AlignmentHead hidden=")],
)  # fmt: skip
def test_projector_widths_are_typed_errors(widths, named) -> None:
    in_dim, out_dim, hidden = widths
    with pytest.raises(OptionError) as e:
        build_projector(in_dim, out_dim, hidden=hidden)
    assert named in str(e.value)


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer(max_length=8)
    ids, mask = tok.batch(["ab", "héllo world"])
    assert ids[0, :3].tolist() == [ord("a") + 3, ord("b") + 3, ByteTokenizer.EOS]
    assert mask.sum(1).tolist() == [3, 8]  # truncated to max_length
    assert ids.max() < ByteTokenizer.vocab_size


def test_student_spec_errors() -> None:
    assert parse_student_spec("hf-pi0:/x") == ("hf-pi0", "/x")
    with pytest.raises(ValueError, match="tiny-vla, hf-vlm:PATH, hf-llava:PATH, hf-pi0:PATH"):
        parse_student_spec("gpt")


def test_tiny_vla_shapes_defaults_and_seeding() -> None:
    s = load_student("tiny-vla")
    assert (s.image_size, s.visual_grid, s.num_layers, s.default_align_layer) == (112, (7, 7), 2, 1)
    small = load_student("tiny-vla", seed=1, **TINY_OPTIONS)
    again = load_student("tiny-vla", seed=1, **TINY_OPTIONS)
    other = load_student("tiny-vla", seed=2, **TINY_OPTIONS)
    sd, sd2, sd3 = small.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd3[k]) for k in sd)
    small.eval()
    out = small(torch.rand(3, 3, 64, 64), ["put the red cube on the plate", "a", ""], 1)
    assert out.actions.shape == (3, 7) and out.actions.dtype == torch.float32
    assert out.visual.shape == (3, 16, 64)
    with pytest.raises(ValueError, match="align-layer"):
        small.check_align_layer(3)
    with pytest.raises(ValueError, match="Expected tiny-vla options among"):
        load_student("tiny-vla", depth=3)


def test_tiny_vla_visual_tokens_are_the_image_positions() -> None:
    s = load_student("tiny-vla", **TINY_OPTIONS).eval()
    images = torch.rand(2, 3, 64, 64)
    # causal decoder: tokens 1..T never see the text, so changing the text leaves them unchanged
    a = s(images, ["put the red cube on the plate", "x"], 2)
    b = s(images, ["pick up the blue sphere", "yy"], 2)
    assert torch.allclose(a.visual, b.visual, atol=1e-5)
    assert not torch.allclose(a.actions, b.actions)
    # ... while the image changes them
    c = s(torch.rand(2, 3, 64, 64), ["put the red cube on the plate", "x"], 2)
    assert not torch.allclose(a.visual, c.visual)
    # right padding: an instruction's action does not depend on the batch's other lengths
    solo = s(images[:1], ["put the red cube on the plate"], 2)
    assert torch.allclose(solo.actions, a.actions[:1], atol=1e-5)
