"""Detection and segmentation: the ViT adapter, scoring, and tiny end-to-end runs on real composites."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from evaluator.backbones import load_backbone, random_backbone
from evaluator.benchmarks import BENCHMARKS, evaluate
from evaluator.datasets import CocoInstances, SemanticSegmentation
from evaluator.detection import DetectionTrainData, build_mask_rcnn, rescale_op, score_detection
from evaluator.segmentation import build_semantic_fpn, predict
from tests.eval_support import composites, micro_checkpoint


def test_adapter_rescales_vit_s16_blocks_as_the_paper_does() -> None:
    ops = [rescale_op(16, stride, 384) for stride in (4, 8, 16, 32)]
    assert [type(m).__name__ for m in ops[0]] == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]
    assert isinstance(ops[1], nn.ConvTranspose2d) and isinstance(ops[2], nn.Identity)
    assert isinstance(ops[3], nn.MaxPool2d)
    grid = torch.randn(1, 384, 14, 14)  # 224 px at stride 16
    assert [tuple(op(grid).shape[-2:]) for op in ops] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert isinstance(rescale_op(4, 4, 32), nn.Identity)  # tiny patch-4 model: same strides by pooling
    assert rescale_op(4, 16, 32).kernel_size == 4  # type: ignore[union-attr]


def test_mask_rcnn_features_sit_at_strides_4_to_64_and_a_frozen_backbone_stays_put() -> None:
    backbone = load_backbone(micro_checkpoint("selfpatch"))
    cfg = BENCHMARKS["det"].config("tiny")
    model = build_mask_rcnn(backbone, 8, cfg)
    features = model.backbone(torch.randn(2, 3, 96, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "0": (24, 24), "1": (12, 12), "2": (6, 6), "3": (3, 3), "pool": (2, 2)
    }  # fmt: skip
    assert all(v.shape[1] == cfg.fpn_channels for v in features.values())  # type: ignore[attr-defined]

    data = CocoInstances(composites(), "train", drop_empty=True)
    image, target = data[0]
    images = [pil_to_tensor(image).float() / 255]
    targets = [{k: v for k, v in target.items() if k != "image_id"}]
    for freeze in (True, False):
        tuned = build_mask_rcnn(backbone, 8, BENCHMARKS["det"].config("tiny", [f"backbone.freeze={freeze}"]))
        before = {k: v.clone() for k, v in tuned.backbone.vit.state_dict().items()}
        head_before = tuned.roi_heads.box_predictor.cls_score.weight.clone()
        optimizer = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.1)
        tuned.train()
        loss = sum(tuned(images, targets).values())
        loss.backward()
        optimizer.step()
        changed = any(not torch.equal(before[k], v) for k, v in tuned.backbone.vit.state_dict().items())
        assert changed is not freeze
        assert not torch.equal(head_before, tuned.roi_heads.box_predictor.cls_score.weight)
    assert torch.equal(  # the loaded backbone itself is never touched
        backbone.vit.pos_embed, load_backbone(micro_checkpoint("selfpatch")).vit.pos_embed
    )


class _Oracle(nn.Module):
    """Returns the ground truth of each validation image as its detections."""

    def __init__(self, data: CocoInstances) -> None:
        super().__init__()
        self.transform = nn.Module()
        self.data, self.index = data, 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        target = self.data.target(self.index)
        self.index += 1
        n = len(target["labels"])
        return [{
            "boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n),
            "masks": target["masks"][:, None].float(),
        }]  # fmt: skip


def test_scoring_the_ground_truth_of_real_composites_gives_ap_100() -> None:
    val = CocoInstances(composites(), "val")
    cfg = BENCHMARKS["det"].config("tiny")
    metrics = score_detection(_Oracle(val), val, cfg, torch.device("cpu"))  # type: ignore[arg-type]
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    assert metrics["val_images"] == len(val)


def test_tiny_detection_runs_end_to_end_on_composites() -> None:
    checkpoint = micro_checkpoint("selfpatch")
    metrics = evaluate("det", checkpoint, composites(), "tiny", overrides=["max_iterations=3"])
    for name in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert 0.0 <= metrics[f"det/{name}"] <= 100.0, name
    assert metrics["det/train_iterations"] == 3 and metrics["det/val_images"] == 3
    assert math.isfinite(metrics["det/train_loss_last"]) and metrics["det/train_loss_last"] > 0
    assert any(k.startswith("det/bbox_AP_") for k in metrics)  # per-class AP of the classes present


def test_semantic_fpn_logits_and_whole_image_prediction_sizes() -> None:
    backbone = random_backbone(micro_checkpoint("dino"))
    cfg = BENCHMARKS["seg"].config("tiny")
    model = build_semantic_fpn(backbone, 9, cfg).eval()
    assert model.indices == [0, 0, 1, 1]  # blocks 3/6/9/12 spread over a 2-block model
    with torch.no_grad():
        assert tuple(model(torch.randn(1, 3, 40, 56)).shape) == (1, 9, 10, 14)  # all maps at stride p = 4
    image, _ = SemanticSegmentation(composites(), "val")[0]
    pred = predict(model, image.resize((90, 70)), cfg, backbone.patch_size, torch.device("cpu"))  # type: ignore[arg-type]
    assert tuple(pred.shape) == (70, 90) and pred.dtype == torch.int64


def test_tiny_segmentation_runs_end_to_end_on_composites() -> None:
    checkpoint = micro_checkpoint("dino")
    metrics = evaluate("seg", checkpoint, composites(), "tiny", overrides=["iterations=3"])
    for name in ("mIoU", "mAcc", "aAcc"):
        assert 0.0 <= metrics[f"seg/{name}"] <= 100.0, name
    assert "seg/IoU_background" in metrics
    assert metrics["seg/train_iterations"] == 3 and metrics["seg/val_images"] == 3
    assert math.isfinite(metrics["seg/train_loss_last"])


def test_full_detection_augmentation_crops_boxes_and_masks_together() -> None:
    data = CocoInstances(composites(8, 4, size=256), "train", drop_empty=True)
    train = DetectionTrainData(data, BENCHMARKS["det"].config("full"))  # type: ignore[arg-type]
    cropped = 0
    for index in range(len(data)):
        image, target = train[index]
        height, width = image.shape[-2:]
        assert target["masks"].shape == (len(target["boxes"]), height, width) and len(target["labels"]) == len(
            target["boxes"]
        )
        boxes = target["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        for box, mask in zip(boxes, target["masks"], strict=True):  # each box still encloses its mask
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert (
                xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1
            )
        cropped += (height, width) != (256, 256)
    assert cropped > 0  # the DETR-style crop policy fired on some images
    first, again = train[0], train[0]
    assert torch.equal(first[0], again[0])  # seeded per (epoch, image)
