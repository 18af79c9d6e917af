"""COCO-style detection and instance segmentation: torchvision Mask R-CNN + FPN on a ViT (spec 3.2).

The ViT adapter is XCiT's, as SelfPatch's detection code uses it: the outputs of four blocks (4/6/8/12 of
a 12-block ViT; evenly spaced blocks for other depths), reshaped to maps at stride p (the patch size), are
rescaled to strides 4/8/16/32. For p=16 that is deconv2x2-BN-GELU-deconv2x2, deconv2x2, identity, maxpool2;
for other patch sizes the same rule (one deconv per factor 2 up, a max-pool down) reaches the same strides.
Everything after the adapter is torchvision's Mask R-CNN (FPN 256, RPN, RoIAlign 7 / 14), trained with the
paper's 1x schedule (AdamW, warm-up, steps at epochs 8 and 11) and scored with pycocotools' COCOeval.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from evaluator.backbones import Backbone, default_out_indices, vit_block_maps
from evaluator.config import DetectionConfig
from evaluator.datasets import CocoInstances, quiet_coco
from evaluator.dense import (
    autocast,
    endless,
    iterations_for,
    param_groups,
    resolve_device,
    seeded,
    step_schedule,
    timing,
    trainable_vit,
)
from trainer.models.vit import MultiCropViT

#: Blocks (1-based) of a 12-block ViT that feed the detection neck (`out_indices=[3, 5, 7, 11]`).
PAPER_BLOCKS = (4, 6, 8, 12)
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# --------------------------------------------------------------------------------------------- the model


def rescale_op(patch_size: int, stride: int, dim: int) -> nn.Module:
    """Map a stride-p feature map to `stride`: deconvs (BN + GELU between) up, a max-pool down."""
    if stride == patch_size:
        return nn.Identity()
    if stride < patch_size:
        steps = math.log2(patch_size / stride)
        if steps != int(steps):
            raise ValueError(f"cannot reach stride {stride} from patch size {patch_size} with 2x deconvolutions")
        layers: list[nn.Module] = []
        for i in range(int(steps)):
            if i:
                layers += [nn.BatchNorm2d(dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        return nn.Sequential(*layers) if len(layers) > 1 else layers[0]
    factor = stride // patch_size
    if factor * patch_size != stride:
        raise ValueError(f"stride {stride} is not a multiple of patch size {patch_size}")
    return nn.MaxPool2d(kernel_size=factor, stride=factor)


class ViTPyramid(nn.Module):
    """ViT blocks -> 4 rescaled maps -> FPN (+ max-pooled level): a torchvision detection backbone."""

    def __init__(
        self, vit: MultiCropViT, indices: Sequence[int], patch_size: int, strides: Sequence[int], fpn_channels: int
    ) -> None:
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        if len(indices) != len(strides):
            raise ValueError(f"{len(indices)} blocks for {len(strides)} strides")
        self.vit = vit
        self.indices = list(indices)
        dim = int(vit.embed_dim)
        self.rescale = nn.ModuleList(rescale_op(patch_size, s, dim) for s in strides)
        self.fpn = FeaturePyramidNetwork([dim] * len(strides), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.frozen = not any(p.requires_grad for p in vit.parameters())

    def train(self, mode: bool = True) -> ViTPyramid:
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = vit_block_maps(self.vit, images, self.indices)
        levels = OrderedDict((str(i), op(m)) for i, (op, m) in enumerate(zip(self.rescale, maps, strict=True)))
        out: OrderedDict[str, torch.Tensor] = self.fpn(levels)
        return out


def build_mask_rcnn(backbone: Backbone, num_classes: int, cfg: DetectionConfig) -> nn.Module:
    """torchvision Mask R-CNN (num_classes foreground classes) on the ViT adapter."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    indices = list(cfg.backbone.out_indices or default_out_indices(backbone.depth, PAPER_BLOCKS))
    vit = trainable_vit(backbone, cfg.backbone)
    pyramid = ViTPyramid(vit, indices, backbone.patch_size, cfg.strides, cfg.fpn_channels)
    names = [str(i) for i in range(len(cfg.strides))]
    channels, mask_channels = cfg.fpn_channels, cfg.mask_head_channels
    model: nn.Module = MaskRCNN(
        pyramid,
        num_classes=None,
        min_size=cfg.train_min_sizes,
        max_size=cfg.max_size,
        size_divisible=math.lcm(max(cfg.strides), backbone.patch_size),
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5),
        rpn_batch_size_per_image=cfg.rpn_batch_size,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
        box_batch_size_per_image=cfg.roi_batch_size,
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, [mask_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
    )
    return model


# ------------------------------------------------------------------------------------------------- data


class DetectionTrainData(Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """COCO training images with flip and the DETR-style crop policy; randomness seeded per (epoch, image)."""

    def __init__(self, coco: CocoInstances, cfg: DetectionConfig) -> None:
        self.coco, self.cfg, self.epoch = coco, cfg, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F
        from torchvision.transforms.v2.functional import pil_to_tensor

        rng = np.random.default_rng([self.cfg.seed, self.epoch, index])
        pil, target = self.coco[index]
        image = tv_tensors.Image(pil_to_tensor(pil))
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(pil.height, pil.width))
        masks = tv_tensors.Mask(target["masks"])
        labels = target["labels"]
        if rng.random() < self.cfg.flip_prob:
            image, boxes, masks = F.horizontal_flip(image), F.horizontal_flip(boxes), F.horizontal_flip(masks)
        if self.cfg.crop_policy and rng.random() < 0.5:
            short = int(rng.choice([400, 500, 600]))
            image = F.resize(image, [short], max_size=self.cfg.max_size, antialias=True)
            boxes, masks = (
                F.resize(boxes, [short], max_size=self.cfg.max_size),
                F.resize(masks, [short], max_size=self.cfg.max_size),
            )
            height, width = image.shape[-2:]
            crop_h = int(rng.integers(min(height, 384), min(height, 600) + 1))
            crop_w = int(rng.integers(min(width, 384), min(width, 600) + 1))
            top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
            image = F.crop(image, top, left, crop_h, crop_w)
            boxes = F.clamp_bounding_boxes(F.crop(boxes, top, left, crop_h, crop_w))
            masks = F.crop(masks, top, left, crop_h, crop_w)
            sized = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
            keep = sized & masks.flatten(1).any(1).bool()
            boxes, masks, labels = boxes[keep], masks[keep], labels[keep]
        out = {
            "boxes": boxes.as_subclass(torch.Tensor).float(),
            "labels": labels,
            "masks": masks.as_subclass(torch.Tensor),
        }
        return image.as_subclass(torch.Tensor).float() / 255.0, out


def _collate(batch: list[Any]) -> tuple[list[Any], list[Any]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


# ---------------------------------------------------------------------------------------------- metrics


def metric_name(text: str) -> str:
    """A class name as a metric-name suffix (letters, digits and underscores)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_") or "class"


def coco_metrics(
    coco_gt: Any,
    results: list[dict[str, Any]],
    iou_type: Literal["bbox", "segm"],
    image_ids: Sequence[int] | None = None,
    per_class: bool = True,
) -> dict[str, float]:
    """COCOeval summary (AP, AP50, AP75, APs/m/l) and per-class AP, in percent.

    Entries that COCOeval leaves undefined (-1: no ground truth in that area range or class) are left out.
    An empty result list scores 0 wherever ground truth exists.
    """
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(results)
    else:
        coco_dt = quiet_coco()
        coco_dt.dataset = {
            "images": coco_gt.dataset["images"],
            "categories": coco_gt.dataset["categories"],
            "annotations": [],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt.createIndex()
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
        evaluator.params.imgIds = list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: 100.0 * float(v) for name, v in zip(COCO_STATS, evaluator.stats[:6], strict=True) if v >= 0}
    if per_class:
        precision = evaluator.eval["precision"]  # (T, R, K, area, maxDets)
        for k, cat_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            if values.size:
                metrics[f"AP_{metric_name(coco_gt.cats[cat_id]['name'])}"] = 100.0 * float(values.mean())
    return metrics


def to_coco_results(
    output: dict[str, torch.Tensor], image_id: int, cat_ids: Sequence[int], mask_threshold: float = 0.5
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's Mask R-CNN output as COCO bbox and segm result entries (masks as RLE)."""
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].float().cpu().numpy()
    scores = output["scores"].float().cpu().numpy()
    labels = output["labels"].cpu().numpy()
    masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8) if "masks" in output else None
    bbox, segm = [], []
    for i in range(len(scores)):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        entry = {"image_id": int(image_id), "category_id": int(cat_ids[int(labels[i]) - 1]), "score": float(scores[i])}
        bbox.append({**entry, "bbox": [x0, y0, x1 - x0, y1 - y0]})
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i]))
            rle["counts"] = rle["counts"].decode("ascii")
            segm.append({**entry, "segmentation": rle})
    return bbox, segm


# ---------------------------------------------------------------------------------------------- running


def evaluate_detection(
    backbone: Backbone, root: Path | str, cfg: DetectionConfig, progress: bool = False
) -> dict[str, float]:
    """Fine-tune Mask R-CNN on the train split of a COCO-layout dataset, score the val split."""
    from tqdm import tqdm

    device = resolve_device(cfg.device)
    train_set = CocoInstances(root, cfg.train_split, drop_empty=True)
    val_set = CocoInstances(root, cfg.val_split)
    if train_set.classes != val_set.classes:
        raise ValueError(f"train and val categories differ: {train_set.classes} vs {val_set.classes}")
    with seeded(cfg.seed, device):
        model = build_mask_rcnn(backbone, len(train_set.classes), cfg).to(device)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        total = iterations_for(cfg.epochs, len(train_set), cfg.batch_size)
        if cfg.max_iterations is not None:
            total = min(total, cfg.max_iterations)
        steps = [round(f * total) for f in cfg.lr_steps]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, step_schedule(steps, 0.1, cfg.warmup_iters, cfg.warmup_ratio)
        )
        data = DetectionTrainData(train_set, cfg)
        batches = endless(data, cfg.batch_size, _collate, cfg.num_workers, cfg.seed, data.set_epoch)
        model.train()
        losses_seen: list[float] = []
        start = time.perf_counter()
        bar = tqdm(range(total), desc="det train", disable=not progress, leave=False, dynamic_ncols=True)
        for _ in bar:
            images, targets = next(batches)
            images = [img.to(device) for img in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with autocast(device, cfg.precision):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detection loss is {float(loss)} at step {len(losses_seen)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses_seen.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses_seen[-1]:.3f}")
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = score_detection(model, val_set, cfg, device, progress)
    metrics |= timing(train_seconds, time.perf_counter() - start, device)
    metrics["train_loss_last"] = float(np.mean(losses_seen[-20:]))
    metrics["train_iterations"] = float(total)
    return metrics


@torch.no_grad()
def score_detection(
    model: nn.Module, val_set: CocoInstances, cfg: DetectionConfig, device: torch.device, progress: bool = False
) -> dict[str, float]:
    """COCOeval bbox and segm metrics of a trained model on the validation images."""
    from torchvision.transforms.v2.functional import pil_to_tensor
    from tqdm import tqdm

    model.eval()
    model.transform.min_size = (cfg.test_min_size,)  # type: ignore[union-attr]
    n = len(val_set) if cfg.max_val_images is None else min(cfg.max_val_images, len(val_set))
    bbox: list[dict[str, Any]] = []
    segm: list[dict[str, Any]] = []
    for index in tqdm(range(n), desc="det eval", disable=not progress, leave=False, dynamic_ncols=True):
        image = pil_to_tensor(val_set.image(index)).float().div(255.0).to(device)
        with autocast(device, cfg.precision):
            (output,) = model([image])
        b, s = to_coco_results(output, val_set.ids[index], val_set.cat_ids)
        bbox += b
        segm += s
    image_ids = val_set.ids[:n]
    metrics = {f"bbox_{k}": v for k, v in coco_metrics(val_set.coco, bbox, "bbox", image_ids, cfg.per_class).items()}
    metrics |= {f"segm_{k}": v for k, v in coco_metrics(val_set.coco, segm, "segm", image_ids, cfg.per_class).items()}
    metrics["val_images"] = float(n)
    return metrics
