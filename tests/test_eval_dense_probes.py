"""Patch-level probes (dense_linear, knn_seg): known answers on built features, determinism, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from evaluator.backbones import PixelFeatures, random_backbone
from evaluator.benchmarks import BENCHMARKS, evaluate
from evaluator.config import DenseLinearConfig, KnnSegConfig
from evaluator.datasets import IGNORE_INDEX
from evaluator.dense_probe import (
    FOREGROUND_CLASSES,
    dense_linear_confusion,
    foreground,
    knn_seg_confusion,
    patch_extractor,
    patch_features,
    patch_labels,
    pixel_confusion,
)
from evaluator.features import FeatureSet
from evaluator.segmentation import segmentation_metrics
from tests.conftest import micro_overrides
from tests.eval_support import composites, micro_checkpoint
from trainer.presets import load_config

CLASSES = ["background", "a", "b"]
GRID, PATCH = 4, 4


def _separable(n: int, seed: int) -> FeatureSet:
    """Images of 4 x 4 patches (4 px each): the left half of the columns one class, the right half another.

    Each patch's feature is 4 x one-hot(class) plus small noise, so the classes are linearly separable.
    """
    generator = torch.Generator().manual_seed(seed)
    left = torch.randint(0, len(CLASSES), (n,), generator=generator)
    right = (left + 1 + torch.randint(0, len(CLASSES) - 1, (n,), generator=generator)) % len(CLASSES)
    classes = torch.empty(n, GRID, GRID, dtype=torch.int64)
    classes[:, :, : GRID // 2] = left.view(-1, 1, 1)
    classes[:, :, GRID // 2 :] = right.view(-1, 1, 1)
    features = 4.0 * torch.eye(8)[classes] + 0.1 * torch.randn(n, GRID, GRID, 8, generator=generator)
    labels = classes.repeat_interleave(PATCH, dim=1).repeat_interleave(PATCH, dim=2).to(torch.uint8)
    return FeatureSet(features, labels)


def _linear_cfg(**changes: object) -> DenseLinearConfig:
    cfg = BENCHMARKS["dense_linear"].config("tiny", ["iterations=50", "train_batch_size=4", "lr=0.1", "warmup_iters=5"])
    assert isinstance(cfg, DenseLinearConfig)
    return cfg.model_copy(update=changes)


def _knn_cfg(**changes: object) -> KnnSegConfig:
    cfg = BENCHMARKS["knn_seg"].config("tiny", ["k=5"])
    assert isinstance(cfg, KnnSegConfig)
    return cfg.model_copy(update=changes)


# ------------------------------------------------------------------------------------- known answers


def test_hand_computed_confusion_matrix_gives_hand_computed_scores() -> None:
    # a 2 x 2 grid of 2-px patches; ground truth per pixel, 255 ignored
    labels = torch.tensor(
        [[[0, 0, 1, 1],
          [0, 255, 1, 2],
          [2, 2, 0, 0],
          [2, 255, 0, 1]]],
        dtype=torch.uint8,
    )  # fmt: skip
    patch_pred = torch.tensor([[[0, 1], [2, 1]]])
    cm = pixel_confusion(patch_pred, labels, num_classes=3)
    # rows = truth, columns = prediction; the patches' valid pixels: top-left predicts 0 for (0 0 0),
    # top-right 1 for (1 1 1 2), bottom-left 2 for (2 2 2), bottom-right 1 for (0 0 0 1)
    expected = torch.tensor([[3, 3, 0], [0, 4, 0], [0, 1, 3]])
    assert torch.equal(cm, expected)
    metrics = segmentation_metrics(cm, CLASSES)
    iou = [3 / (6 + 3 - 3), 4 / (4 + 8 - 4), 3 / (4 + 3 - 3)]  # TP / (GT + predicted - TP)
    acc = [3 / 6, 4 / 4, 3 / 4]
    assert metrics["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert metrics["mAcc"] == pytest.approx(100 * sum(acc) / 3)
    assert metrics["aAcc"] == pytest.approx(100 * 10 / 14)  # 16 pixels, 2 ignored, 10 right
    assert int(cm.sum()) == int((labels != IGNORE_INDEX).sum()) == 14


def test_patch_labels_take_the_majority_and_drop_mostly_ignored_patches() -> None:
    labels = torch.tensor(
        [[[1, 1, 2, 2],
          [1, 2, 2, 1],
          [255, 255, 0, 255],
          [255, 1, 255, 2]]],
        dtype=torch.uint8,
    )  # fmt: skip
    # top-left: 1 wins 3-1; top-right: 2 wins 3-1; bottom-left: 3 of 4 ignored; bottom-right: tie 0/2 -> 0, 50 % ignored
    got = patch_labels(labels, (2, 2), num_classes=3, max_ignore_fraction=0.5)
    assert got.tolist() == [[[1, 2], [-1, 0]]]
    assert patch_labels(labels, (2, 2), 3, max_ignore_fraction=0.25).tolist() == [[[1, 2], [-1, -1]]]


def test_separable_patch_features_score_100_with_both_probes() -> None:
    train, val = _separable(24, seed=0), _separable(8, seed=1)
    cm, losses = dense_linear_confusion(train, val, len(CLASSES), _linear_cfg())
    assert segmentation_metrics(cm, CLASSES)["mIoU"] == 100.0 and losses[-1] < losses[0]
    cm, sizes = knn_seg_confusion(train, val, len(CLASSES), _knn_cfg())
    metrics = segmentation_metrics(cm, CLASSES)
    assert (metrics["mIoU"], metrics["mAcc"], metrics["aAcc"]) == (100.0, 100.0, 100.0)
    assert sizes == {"train_patches": 24 * GRID * GRID, "bank_patches": 24 * GRID * GRID}


def test_foreground_labels_merge_the_objects_and_score_what_separates_them_from_the_scene() -> None:
    """Objects a and b share one feature (they cannot be told apart, only from the background): the class
    probe cannot reach 100, the foreground probe does; ignore pixels stay ignored."""
    train, val = _separable(24, seed=0), _separable(8, seed=1)
    for split in (train, val):
        split.features[..., 2] += split.features[..., 1]  # b looks like a
        split.features[..., 1] = split.features[..., 2]
        split.labels[:, 0, 0] = IGNORE_INDEX
    merged = foreground(val)
    assert set(merged.labels.unique().tolist()) == {0, 1, IGNORE_INDEX} and torch.equal(
        val.labels == 0, merged.labels == 0
    )
    cm, _ = knn_seg_confusion(train, val, len(CLASSES), _knn_cfg())
    assert segmentation_metrics(cm, CLASSES)["mIoU"] < 100.0
    cm, _ = knn_seg_confusion(foreground(train), merged, 2, _knn_cfg())
    assert segmentation_metrics(cm, list(FOREGROUND_CLASSES))["mIoU"] == 100.0


def test_ignore_pixels_are_ignored_by_training_banks_and_scores() -> None:
    train, val = _separable(24, seed=0), _separable(8, seed=1)
    ignored = FeatureSet(train.features.clone(), train.labels.clone())
    ignored.labels[:, :PATCH, :PATCH] = IGNORE_INDEX  # the first patch of every image is all ignore
    val_ignored = FeatureSet(val.features.clone(), val.labels.clone())
    val_ignored.labels[:, :PATCH, :PATCH] = IGNORE_INDEX
    cm, _ = dense_linear_confusion(ignored, val_ignored, len(CLASSES), _linear_cfg())
    assert segmentation_metrics(cm, CLASSES)["mIoU"] == 100.0
    assert int(cm.sum()) == len(val) * ((GRID * PATCH) ** 2 - PATCH**2)
    # k-NN: features of the wrong class where only ignore pixels lie, in the train bank and in val
    for data in (ignored, val_ignored):
        data.features[:, 0, 0] = data.features[:, 0, -1]
    cm, sizes = knn_seg_confusion(ignored, val_ignored, len(CLASSES), _knn_cfg())
    assert segmentation_metrics(cm, CLASSES)["mIoU"] == 100.0
    assert sizes["train_patches"] == 24 * (GRID * GRID - 1)  # the ignored patches stay out of the bank


def test_knn_vote_is_weighted_by_exp_similarity_over_temperature() -> None:
    # one class-2 neighbour at cosine 1.0 outvotes two class-1 neighbours at cosine 0.8 (T=0.07), not at T=100
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]]).view(3, 1, 1, 2)
    train = FeatureSet(bank, torch.tensor([2, 1, 1], dtype=torch.uint8).view(3, 1, 1))
    val = FeatureSet(torch.tensor([[1.0, 0.0]]).view(1, 1, 1, 2), torch.tensor([[[2]]], dtype=torch.uint8))
    cm, _ = knn_seg_confusion(train, val, 3, _knn_cfg(k=3))
    assert cm[2, 2] == 1
    cm, _ = knn_seg_confusion(train, val, 3, _knn_cfg(k=3, temperature=100.0))
    assert cm[2, 1] == 1


def test_bank_subsampling_is_seeded_and_results_repeat() -> None:
    train, val = _separable(24, seed=0), _separable(8, seed=1)
    cfg = _knn_cfg(max_bank_patches=50)
    first, sizes = knn_seg_confusion(train, val, len(CLASSES), cfg)
    again, _ = knn_seg_confusion(train, val, len(CLASSES), cfg)
    assert sizes == {"train_patches": 24 * GRID * GRID, "bank_patches": 50} and torch.equal(first, again)
    cm, losses = dense_linear_confusion(train, val, len(CLASSES), _linear_cfg(standardize=False))
    cm2, losses2 = dense_linear_confusion(train, val, len(CLASSES), _linear_cfg(standardize=False))
    assert torch.equal(cm, cm2) and losses == losses2


# ------------------------------------------------------------------------------------- features


def test_patch_features_are_the_normed_last_block_tokens_and_pixels_patchify(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", micro_overrides(tmp_path, "dino"))
    backbone = random_backbone(cfg, seed=0)
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        tokens = backbone.vit.forward_features(images)[:, 1:]  # final norm applied, [CLS] dropped
        got = patch_features(backbone, images)
        assert got.shape == (2, 4, 6, 32)
        assert torch.allclose(got.reshape(2, 24, 32), tokens, atol=1e-5)
        assert patch_features(backbone, images, n_last_blocks=2).shape == (2, 4, 6, 64)
    probe = BENCHMARKS["knn_seg"].config("tiny")
    assert isinstance(probe, KnnSegConfig)
    pixels = patch_extractor(PixelFeatures(), probe, torch.device("cpu")).fn(images)
    assert pixels.shape == (2, 4, 6, 3 * PATCH * PATCH)
    assert torch.equal(pixels[1, 2, 3].view(3, PATCH, PATCH), images[1, :, 8:12, 12:16])
    odd_crop = probe.model_copy(update={"transform": probe.transform.model_copy(update={"crop": 62})})
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patch_extractor(backbone, odd_crop, torch.device("cpu"))


def test_full_configs_fit_vit_s16_on_ade20k_and_tiny_ones_the_tiny_presets() -> None:
    for name in ("dense_linear", "knn_seg"):
        full, tiny = BENCHMARKS[name].config("full"), BENCHMARKS[name].config("tiny")
        assert isinstance(full, DenseLinearConfig | KnnSegConfig) and isinstance(tiny, DenseLinearConfig | KnnSegConfig)
        assert full.transform.crop % 16 == 0 and full.pixel_patch_size == 16 and full.feature_dtype == "float16"
        assert tiny.transform.crop % 4 == 0 and tiny.pixel_patch_size == 4 and tiny.num_workers == 0
        assert BENCHMARKS[name].accepts_pixels


# ------------------------------------------------------------------------------------- end to end


def test_both_probes_run_end_to_end_share_cached_features_and_repeat(tmp_path: Path) -> None:
    checkpoint, root = micro_checkpoint("selfpatch"), composites(12, 6, size=64)
    overrides = {"dense_linear": ["iterations=60"], "knn_seg": []}
    runs = {}
    for name in ("dense_linear", "knn_seg"):
        runs[name] = metrics = evaluate(name, checkpoint, root, "tiny", overrides=overrides[name], cache_dir=tmp_path)
        for metric in ("mIoU", "mAcc", "aAcc"):
            assert 0.0 <= metrics[f"{name}/{metric}"] <= 100.0, (name, metric)
        assert f"{name}/IoU_background" in metrics
        assert metrics[f"{name}/train_images"] == 12 and metrics[f"{name}/val_images"] == 6
    assert math.isfinite(runs["dense_linear"]["dense_linear/train_loss_last"])
    assert runs["knn_seg"]["knn_seg/feature_seconds"] == 0.0  # the features dense_linear cached
    assert 0 < runs["knn_seg"]["knn_seg/bank_patches"] <= 12 * 16 * 16
    again = evaluate("dense_linear", checkpoint, root, "tiny", overrides=["iterations=60"], cache_dir=tmp_path)
    assert again["dense_linear/feature_seconds"] == 0.0
    assert again["dense_linear/mIoU"] == runs["dense_linear"]["dense_linear/mIoU"]


def test_random_and_pixel_baselines_run_through_evaluate() -> None:
    checkpoint, root = micro_checkpoint("selfpatch"), composites(12, 6, size=64)
    for baseline in ("random", "pixels"):
        first = evaluate("knn_seg", checkpoint, root, "tiny", baseline=baseline)
        assert 0.0 <= first["knn_seg/mIoU"] <= 100.0
        assert evaluate("knn_seg", checkpoint, root, "tiny", baseline=baseline)["knn_seg/mIoU"] == first["knn_seg/mIoU"]
    linear = evaluate("dense_linear", None, root, "tiny", overrides=["iterations=30"], baseline="pixels")
    assert 0.0 <= linear["dense_linear/mIoU"] <= 100.0
