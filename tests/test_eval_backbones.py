"""Loading checkpoints and exports into frozen feature extractors, and failing loudly on bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluator.backbones import FeatureSpec, default_out_indices, load_backbone, random_backbone
from tests.eval_support import micro_checkpoint
from trainer.checkpoint import CheckpointError, load_checkpoint, strip_prefixes
from trainer.export import export_checkpoint
from trainer.files import sha256_file
from trainer.models.wrapper import build_model
from trainer.weights import config_of


def _teacher(path: Path) -> torch.nn.Module:
    """The trainer's own teacher network, loaded from the checkpoint: the reference features."""
    state = load_checkpoint(path)
    model = build_model(config_of(state, path), student=False)
    model.load_state_dict(strip_prefixes(state["teacher"]), strict=True)
    return model.eval()


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_dino_cls_features_equal_the_teachers_and_concatenate_the_last_blocks() -> None:
    path = micro_checkpoint("dino")
    backbone = load_backbone(path)
    assert backbone.identity == sha256_file(path)
    assert backbone.ca_head is None and backbone.has_cls
    x = _images()
    reference = _teacher(path).backbone.features(x)
    ours = backbone.image_features(x, FeatureSpec(pool="cls"))
    torch.testing.assert_close(ours, reference)
    two = backbone.image_features(x, FeatureSpec(pool="cls", n_last_blocks=2))
    assert two.shape == (3, 2 * backbone.embed_dim)
    torch.testing.assert_close(two[:, backbone.embed_dim :], reference)  # the last block comes last
    assert backbone.resolve(FeatureSpec()).pool == "cls"


@torch.no_grad()
def test_selfpatch_aggregation_token_and_pooled_patches_equal_the_teachers() -> None:
    path = micro_checkpoint("selfpatch")
    backbone = load_backbone(path)
    teacher = _teacher(path)
    x = _images(size=24)  # another size than training: positional embeddings are resized as in training
    tokens = teacher.backbone.features(x)
    image_token, _ = teacher.ca_head(tokens, (6, 6), match=False)
    torch.testing.assert_close(backbone.image_features(x, FeatureSpec(pool="ca")), image_token)
    torch.testing.assert_close(backbone.image_features(x, FeatureSpec(pool="avg")), tokens.mean(dim=1))
    assert backbone.resolve(FeatureSpec()).pool == "ca"
    with pytest.raises(CheckpointError, match="no \\[CLS\\] token"):
        backbone.image_features(x, FeatureSpec(pool="cls"))
    with pytest.raises(ValueError, match="last block only"):
        backbone.resolve(FeatureSpec(pool="ca", n_last_blocks=2))
    maps = backbone.block_maps(x, [0, 0, 1])
    assert [tuple(m.shape) for m in maps] == [(3, backbone.embed_dim, 6, 6)] * 3
    torch.testing.assert_close(maps[0], maps[1])
    assert not any(p.requires_grad for p in backbone.parameters())


@torch.no_grad()
def test_export_folder_loads_the_same_backbone_and_aggregation_module(tmp_path: Path) -> None:
    path = micro_checkpoint("selfpatch")
    manifest = export_checkpoint(path, tmp_path / "export")
    exported = load_backbone(tmp_path / "export")
    assert exported.identity == manifest["files"]["safetensors"]["sha256"]
    x = _images()
    training = load_backbone(path)
    for pool in ("avg", "ca"):  # SelfPatch exports carry the aggregation module, so both features match
        reference = training.image_features(x, FeatureSpec(pool=pool))
        torch.testing.assert_close(exported.image_features(x, FeatureSpec(pool=pool)), reference)
        torch.testing.assert_close(
            load_backbone(tmp_path / "export" / "manifest.json").image_features(x, FeatureSpec(pool=pool)), reference
        )
    assert exported.resolve(FeatureSpec()).pool == "ca"


def test_export_without_the_aggregation_module_falls_back_to_pooled_patches(tmp_path: Path) -> None:
    path = micro_checkpoint("selfpatch")
    export_checkpoint(path, tmp_path / "export", formats=("torch", "safetensors"))
    exported = load_backbone(tmp_path / "export")
    assert exported.resolve(FeatureSpec()).pool == "avg"  # auto falls back: no ca_head in this export
    with pytest.raises(CheckpointError, match="ca_head"):
        exported.resolve(FeatureSpec(pool="ca"))


def test_corrupt_files_fail_with_a_clear_reason(tmp_path: Path) -> None:
    path = micro_checkpoint("selfpatch")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_backbone(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_backbone(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "missing.pth")
    export_checkpoint(path, tmp_path / "export")
    weights = tmp_path / "export" / "backbone.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: sha256"):
        load_backbone(tmp_path / "export")


def _modified(tmp_path: Path, name: str, edit) -> Path:  # type: ignore[no-untyped-def]
    state = load_checkpoint(micro_checkpoint("selfpatch"))
    edit(state)
    out = tmp_path / name
    torch.save(state, out)
    return out


def test_incompatible_checkpoints_fail_naming_the_problem(tmp_path: Path) -> None:
    def deeper(state: dict) -> None:
        state["config"]["model"]["depth"] = 3

    def wider(state: dict) -> None:
        state["config"]["model"]["embed_dim"] = 64

    def drop_ca_head(state: dict) -> None:
        state["teacher"] = {k: v for k, v in state["teacher"].items() if not k.startswith("ca_head.")}

    def nan_weights(state: dict) -> None:
        state["teacher"]["backbone.blocks.0.attn.qkv.weight"][0, 0] = float("nan")

    def dino_config(state: dict) -> None:
        state["config"]["method"] = "dino"

    with pytest.raises(CheckpointError, match=r"missing blocks\.2"):
        load_backbone(_modified(tmp_path, "deeper.pth", deeper))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_backbone(_modified(tmp_path, "wider.pth", wider))
    with pytest.raises(CheckpointError, match=r"no .ca_head\.\*. weights"):
        load_backbone(_modified(tmp_path, "no_ca.pth", drop_ca_head))
    with pytest.raises(CheckpointError, match="NaN"):
        load_backbone(_modified(tmp_path, "nan.pth", nan_weights))
    with pytest.raises(CheckpointError, match="missing cls_token"):
        load_backbone(_modified(tmp_path, "dino_config.pth", dino_config))
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, plain)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_backbone(plain)
    bad_config = _modified(tmp_path, "bad_config.pth", lambda s: s["config"]["model"].update(arch="vit_huge"))
    with pytest.raises(CheckpointError, match="stored config is not valid"):
        load_backbone(bad_config)


@torch.no_grad()
def test_random_backbone_has_the_shape_but_not_the_weights() -> None:
    path = micro_checkpoint("selfpatch")
    trained, random_a, random_b = load_backbone(path), random_backbone(path, seed=0), random_backbone(path, seed=0)
    assert random_a.identity.startswith("random-init:") and random_a.identity == random_b.identity
    assert random_backbone(path, seed=1).identity != random_a.identity
    x = _images()
    a = random_a.image_features(x, FeatureSpec(pool="ca"))
    assert a.shape == trained.image_features(x, FeatureSpec(pool="ca")).shape
    torch.testing.assert_close(a, random_b.image_features(x, FeatureSpec(pool="ca")))  # seeded
    assert not torch.allclose(a, trained.image_features(x, FeatureSpec(pool="ca")))


def test_dense_block_choice_follows_the_paper_and_spreads_for_other_depths() -> None:
    assert default_out_indices(12, (4, 6, 8, 12)) == [3, 5, 7, 11]  # detection
    assert default_out_indices(12, (3, 6, 9, 12)) == [2, 5, 8, 11]  # segmentation
    assert default_out_indices(4, (4, 6, 8, 12)) == [0, 1, 2, 3]
    assert default_out_indices(6, (3, 6, 9, 12)) == [1, 2, 4, 5]
    assert default_out_indices(2, (3, 6, 9, 12)) == [0, 0, 1, 1]
