"""The one reader (`trainer.weights`): our files and foreign layouts give the same backbone, strictly checked.

Foreign files are built from our own micro models in the official key layouts (DINO / SelfPatch training
checkpoints, DINO-eval, timm, mm, safetensors), so the features they load into must equal our own exactly.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from evaluator.__main__ import main
from evaluator.backbones import FeatureSpec, load_backbone
from evaluator.benchmarks import evaluate
from tests.conftest import FASHION_MNIST
from tests.eval_support import micro_checkpoint
from trainer.checkpoint import CheckpointError, load_checkpoint, strip_prefixes
from trainer.config import TrainConfig
from trainer.export import export_checkpoint
from trainer.files import sha256_file
from trainer.models.vit import build_backbone
from trainer.models.wrapper import build_model
from trainer.weights import LAYOUTS, load_exported_backbone, read_weights

HEADS = 2  # the micro models are 32 wide: no named ViT, so the head count is given


def _teacher(path: Path) -> torch.nn.Module:
    """The trainer's own teacher network: the reference features."""
    state = load_checkpoint(path)
    model = build_model(read_weights(path).config, student=False)
    model.load_state_dict(strip_prefixes(state["teacher"]), strict=True)
    return model.eval()


def _images(size: int = 32, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


def _official(method: str) -> dict[str, Any]:
    """Our micro checkpoint in the official main_dino.py / main_selfpatch.py layout (DDP student, Namespace args)."""
    state = load_checkpoint(micro_checkpoint(method))
    args = argparse.Namespace(arch="vit_small", patch_size=4, out_dim=128, k_num=4, local_crops_number=2)
    return {
        "student": {f"module.{k}": v for k, v in state["student"].items()},
        "teacher": dict(state["teacher"]),
        "optimizer": state["optimizer"],
        "epoch": 1,
        "args": args,
        "dino_loss": state["dino_loss"],
    }


def _save(tmp_path: Path, name: str, obj: Any) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _backbone_keys(method: str) -> dict[str, torch.Tensor]:
    """The teacher backbone as a plain timm state dict."""
    teacher = load_checkpoint(micro_checkpoint(method))["teacher"]
    return {k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")}


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("method", ["dino", "selfpatch"])
def test_official_training_checkpoints_give_our_features(tmp_path: Path, method: str) -> None:
    path = _save(tmp_path, "official.pth", _official(method))
    with pytest.raises(CheckpointError, match="num_heads"):
        read_weights(path)  # 32 wide: no named ViT has that width
    record = read_weights(path, num_heads=HEADS)
    assert record.layout == "official" and record.meta == {"epoch": 1}
    assert record.identity == f"{sha256_file(path)}:heads={HEADS}"
    ours = read_weights(micro_checkpoint(method)).config
    assert record.config.method == method and record.config.model.dims == ours.model.dims
    assert (record.config.model.patch_size, record.config.img_size) == (4, 32)

    backbone, teacher = load_backbone(path, num_heads=HEADS), _teacher(micro_checkpoint(method))
    x = _images()
    tokens = teacher.backbone.features(x)
    if method == "dino":
        _assert_same(backbone.image_features(x, FeatureSpec(pool="cls")), tokens)
    else:
        assert record.config.selfpatch.num_blocks == ours.selfpatch.num_blocks
        image_token, _ = teacher.ca_head(tokens, (8, 8), match=False)
        _assert_same(backbone.image_features(x, FeatureSpec(pool="ca")), image_token)
        _assert_same(backbone.image_features(x, FeatureSpec(pool="avg")), tokens.mean(dim=1))
    student = load_backbone(path, "student", num_heads=HEADS)
    assert student.identity.startswith(f"{sha256_file(path)}:student")


@torch.no_grad()
@pytest.mark.parametrize("method", ["dino", "selfpatch"])
def test_eval_timm_and_mm_layouts_give_our_features(tmp_path: Path, method: str) -> None:
    plain = _backbone_keys(method)
    noise = {k: torch.randn_like(v) for k, v in plain.items()}
    classifier = {"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    files = {
        "teacher": {"teacher": {f"backbone.{k}": v for k, v in plain.items()} | {"head.mlp.0.weight": torch.ones(2)}},
        "timm": {**plain, **classifier},  # timm's classifier head is dropped
        "timm-model": {"model": {f"module.{k}": v for k, v in plain.items()}},
        "timm-ema": {"state_dict_ema": plain, "state_dict": noise},  # timm prefers the EMA weights
        "mm": {"state_dict": {**{f"backbone.{k}": v for k, v in plain.items()}, "neck.conv.weight": torch.ones(1)}},
    }
    reference = build_backbone(
        read_weights(micro_checkpoint(method)).config.model, method, 32, drop_path_rate=0.0
    ).eval()
    reference.load_state_dict(plain, strict=True)
    x = _images(24)
    expected = reference.features(x)
    for name, obj in files.items():
        record = read_weights(_save(tmp_path, f"{name}.pth", obj), num_heads=HEADS)
        assert record.layout == name.split("-")[0] and record.layout in LAYOUTS
        _assert_same(record.vit().eval().features(x), expected)
    from safetensors.torch import save_file

    save_file(plain, str(tmp_path / "model.safetensors"))
    _assert_same(read_weights(tmp_path / "model.safetensors", num_heads=HEADS).vit().eval().features(x), expected)


@torch.no_grad()
def test_named_widths_need_no_head_count_and_the_model_is_inferred_from_the_tensors(tmp_path: Path) -> None:
    cfg = TrainConfig.model_validate(
        {
            "method": "dino",
            "model": {"arch": "vit_tiny", "patch_size": 16, "depth": 1, "img_size": 48},
            "crops": {"global_size": 48, "local_size": 16},
        }
    )
    vit = build_backbone(cfg.model, "dino", 48, drop_path_rate=0.0).eval()
    path = _save(tmp_path, "dino_vittiny.pth", vit.state_dict())
    record = read_weights(path)
    assert record.layout == "timm" and record.identity == sha256_file(path)
    model = record.config.model
    assert (model.arch, model.dims, model.patch_size, record.config.img_size) == ("vit_tiny", (192, 1, 3), 16, 48)
    x = _images(64, n=2)
    _assert_same(record.vit().eval().features(x), vit.features(x))


def _edited(tmp_path: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    official = _official("selfpatch")
    edit(official["teacher"])
    return _save(tmp_path, name, official)


def test_foreign_files_with_missing_extra_misshaped_or_nan_weights_fail_naming_them(tmp_path: Path) -> None:
    def missing(t: dict[str, torch.Tensor]) -> None:
        del t["backbone.blocks.1.mlp.fc2.bias"]

    def extra(t: dict[str, torch.Tensor]) -> None:
        t["backbone.blocks.0.attn.extra"] = torch.zeros(1)

    def misshaped(t: dict[str, torch.Tensor]) -> None:
        t["backbone.blocks.0.mlp.fc1.weight"] = t["backbone.blocks.0.mlp.fc1.weight"][:-1]

    def nan(t: dict[str, torch.Tensor]) -> None:
        t["backbone.pos_embed"][0, 0, 0] = float("nan")

    def ca_missing(t: dict[str, torch.Tensor]) -> None:
        del t["ca_head.cls_blocks.1.norm2.weight"]

    def ca_absent(t: dict[str, torch.Tensor]) -> None:
        for key in [k for k in t if k.startswith("ca_head.")]:
            del t[key]

    def stranger(t: dict[str, torch.Tensor]) -> None:
        t["projector.weight"] = torch.zeros(1)

    def dino_with_ca_head(t: dict[str, torch.Tensor]) -> None:
        dino = load_checkpoint(micro_checkpoint("dino"))["teacher"]
        t.update({k: v for k, v in dino.items() if k.startswith("backbone.")})

    cases = [
        (missing, r"missing blocks\.1\.mlp\.fc2\.bias"),
        (extra, r"unexpected blocks\.0\.attn\.extra"),
        (misshaped, r"shape mismatch blocks\.0\.mlp\.fc1\.weight \(127, 32\) vs \(128, 32\)"),
        (nan, r"NaN or inf \(pos_embed\)"),
        (ca_missing, r"aggregation module \(ca_head\) weights .*missing cls_blocks\.1\.norm2\.weight"),
        (ca_absent, r"no .ca_head\.\*. weights"),
        (stranger, r"unexpected weights under 'teacher': projector\.weight"),
        (dino_with_ca_head, r"unexpected 'ca_head\.\*' weights next to a DINO backbone"),
    ]
    for edit, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_backbone(_edited(tmp_path, f"{edit.__name__}.pth", edit), num_heads=HEADS)
    timm_file = _save(tmp_path, "timm_extra.pth", {**_backbone_keys("dino"), "fc_norm.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match=r"unexpected fc_norm\.weight"):
        read_weights(timm_file, num_heads=HEADS)
    with pytest.raises(CheckpointError, match="holds one network, not a 'student' one"):
        read_weights(timm_file, key="student", num_heads=HEADS)


@torch.no_grad()
def test_an_official_checkpoint_exports_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tmp_path, "official.pth", _official("selfpatch"))
    manifest = export_checkpoint(path, tmp_path / "export", num_heads=HEADS)
    assert manifest["source_checkpoint"]["layout"] == "official" and "aggregation" in manifest["files"]
    x = _images()
    _assert_same(
        load_backbone(tmp_path / "export").image_features(x, FeatureSpec(pool="ca")),
        load_backbone(path, num_heads=HEADS).image_features(x, FeatureSpec(pool="ca")),
    )
    small = ["max_train_samples=60", "max_test_samples=20", "batch_size=32", "ks=[5]"]
    metrics = evaluate("knn", path, FASHION_MNIST, "tiny", overrides=small, num_heads=HEADS)
    assert 0.0 <= metrics["knn/top1_k5"] <= 100.0
    argv = ["knn", "--checkpoint", str(path), "--data", str(FASHION_MNIST), "--no-cache", "--output", "json", *small]
    assert main([*argv, "--num-heads", str(HEADS)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["checkpoint_sha256"] == f"{sha256_file(path)}:heads={HEADS}"
    assert record["metrics"]["knn/top1_k5"] == metrics["knn/top1_k5"]
    assert main(argv) == 2 and "--num-heads" in capsys.readouterr().err


@torch.no_grad()
@pytest.mark.parametrize("method", ["selfpatch", "dino"])
def test_exported_backbone_reproduces_our_features_at_any_size(tmp_path: Path, method: str) -> None:
    import timm
    from safetensors.torch import load_file

    checkpoint = micro_checkpoint(method)
    manifest = export_checkpoint(checkpoint, tmp_path / "export", formats=("safetensors",))
    folder = tmp_path / "elsewhere"  # the export alone: no training checkpoint next to it
    shutil.copytree(tmp_path / "export", folder)
    assert manifest["timm"]["kwargs"]["dynamic_img_size"] is True and manifest["pos_embed_interp"] == "dino"
    assert json.loads((folder / "manifest.json").read_text())["img_size"] == 32

    ours = load_exported_backbone(folder)
    teacher = _teacher(checkpoint).backbone
    plain = timm.create_model(manifest["timm"]["model_name"], pretrained=False, **manifest["timm"]["kwargs"]).eval()
    plain.load_state_dict(load_file(folder / "backbone.safetensors"), strict=True)
    for size in (32, 16, 48):  # the training size, and two others
        x = _images(size)
        _assert_same(ours.features(x), teacher.features(x))
        tokens = plain.forward_features(x)
        timm_features = tokens[:, 0] if method == "dino" else tokens
        if size == 32:
            _assert_same(timm_features, teacher.features(x))
        else:  # timm resamples the position grid its own way: close, never the trainer's exact features
            assert not torch.allclose(timm_features, teacher.features(x), rtol=0, atol=1e-6)
