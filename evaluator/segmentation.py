"""ADE20K-style semantic segmentation: Semantic FPN on a ViT (spec 3.3), scored from a confusion matrix.

As in SelfPatch's mmseg config, the outputs of blocks 3/6/9/12 (evenly spaced blocks for other depths)
all stay at stride p (no deconvolution pyramid), go through an FPN neck (4 x dim -> 256) and mmseg's
FPNHead (channels 128, BN + ReLU, dropout 0.1), which still declares strides 4/8/16/32 and so gives the
deeper levels more conv + upsample stages. Training: AdamW, poly decay after a linear warm-up, crops of
the rescaled image with mmseg's cat_max_ratio rule, flip, photometric distortion, ignore index 255.
Metrics (percent): mIoU, mAcc, aAcc and per-class IoU, classes without ground truth or prediction left
out of the means (mmseg's nanmean).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from evaluator.backbones import Backbone, default_out_indices, vit_block_maps
from evaluator.config import IMAGENET_MEAN, IMAGENET_STD, SegmentationConfig
from evaluator.datasets import IGNORE_INDEX, SemanticSegmentation
from evaluator.dense import (
    autocast,
    endless,
    param_groups,
    poly_schedule,
    resolve_device,
    seeded,
    timing,
    trainable_vit,
)
from evaluator.detection import metric_name
from trainer.models.vit import MultiCropViT

#: Blocks (1-based) of a 12-block ViT that feed the neck (`out_indices=(2, 5, 8, 11)`).
PAPER_BLOCKS = (3, 6, 9, 12)


# --------------------------------------------------------------------------------------------- the model


class FPNHead(nn.Module):
    """mmseg's FPNHead: per level, max(1, log2(stride/4)) conv-BN-ReLU stages with 2x upsampling, summed."""

    def __init__(
        self, in_channels: int, channels: int, feature_strides: Sequence[int], num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in feature_strides:
            length = max(1, int(math.log2(stride) - math.log2(feature_strides[0])))
            layers: list[nn.Module] = []
            for k in range(length):
                layers += [
                    nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                ]
                if stride != feature_strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)  # type: ignore[arg-type]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.scale_heads[0](features[0])
        for head, feat in zip(self.scale_heads[1:], features[1:], strict=True):
            out = out + F.interpolate(head(feat), size=out.shape[2:], mode="bilinear", align_corners=False)
        logits: torch.Tensor = self.conv_seg(self.dropout(out))
        return logits


class SemanticFPN(nn.Module):
    """ViT blocks (all at stride p) -> FPN neck -> FPNHead -> logits at stride p."""

    def __init__(self, vit: MultiCropViT, indices: Sequence[int], num_classes: int, cfg: SegmentationConfig) -> None:
        from torchvision.ops import FeaturePyramidNetwork

        super().__init__()
        self.vit = vit
        self.indices = list(indices)
        dim = int(vit.embed_dim)
        self.neck = FeaturePyramidNetwork([dim] * len(self.indices), cfg.fpn_channels)
        self.head = FPNHead(cfg.fpn_channels, cfg.head_channels, cfg.feature_strides, num_classes, cfg.dropout)
        self.frozen = not any(p.requires_grad for p in vit.parameters())

    def train(self, mode: bool = True) -> SemanticFPN:
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = vit_block_maps(self.vit, images, self.indices)
        levels = self.neck({str(i): m for i, m in enumerate(maps)})
        out: torch.Tensor = self.head(list(levels.values()))
        return out


def build_semantic_fpn(backbone: Backbone, num_classes: int, cfg: SegmentationConfig) -> SemanticFPN:
    indices = list(cfg.backbone.out_indices or default_out_indices(backbone.depth, PAPER_BLOCKS))
    return SemanticFPN(trainable_vit(backbone, cfg.backbone), indices, num_classes, cfg)


# ------------------------------------------------------------------------------------------------- data


def rescale_size(width: int, height: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= scale[0] and short side <= scale[1]."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an RGB uint8 array: brightness, contrast, saturation, hue (each p=0.5)."""
    img = image.astype(np.float32)

    def contrast(x: np.ndarray) -> np.ndarray:
        return np.clip(x * rng.uniform(0.5, 1.5), 0, 255) if rng.integers(2) else x

    if rng.integers(2):
        img = np.clip(img + rng.uniform(-32, 32), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        img = contrast(img)
    hsv = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("HSV")).astype(np.float32)
    if rng.integers(2):
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
    if rng.integers(2):
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 19) * 256.0 / 180.0) % 256  # OpenCV hue units -> PIL's
    img = np.asarray(Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")).astype(np.float32)
    if not contrast_first:
        img = contrast(img)
    return img.astype(np.uint8)


def _normalise(image: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0  # a writable copy
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


class SegmentationTrainData(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Rescale (random ratio), cat_max_ratio crop, flip, photometric distortion, pad; seeded per (epoch, image)."""

    def __init__(self, dataset: SemanticSegmentation, cfg: SegmentationConfig) -> None:
        self.dataset, self.cfg, self.epoch = dataset, cfg, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.epoch, index])
        pil, label = self.dataset[index]
        ratio = rng.uniform(*cfg.ratio_range)
        size = rescale_size(pil.width, pil.height, (cfg.scale[0] * ratio, cfg.scale[1] * ratio))
        image = np.asarray(pil.resize(size, Image.Resampling.BILINEAR))
        label = np.asarray(
            Image.fromarray(label.astype(np.uint8)).resize(size, Image.Resampling.NEAREST), dtype=np.int64
        )
        crop = cfg.crop_size
        for _ in range(10):
            top = int(rng.integers(0, max(label.shape[0] - crop, 0) + 1))
            left = int(rng.integers(0, max(label.shape[1] - crop, 0) + 1))
            window = label[top : top + crop, left : left + crop]
            _, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < cfg.cat_max_ratio:
                break
        image, label = image[top : top + crop, left : left + crop], label[top : top + crop, left : left + crop]
        if rng.random() < cfg.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if cfg.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        tensor = _normalise(image)
        padded = torch.zeros(3, crop, crop)
        padded_label = torch.full((crop, crop), IGNORE_INDEX, dtype=torch.int64)
        padded[:, : tensor.shape[1], : tensor.shape[2]] = tensor
        padded_label[: label.shape[0], : label.shape[1]] = torch.from_numpy(np.ascontiguousarray(label))
        return padded, padded_label


def _collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batch, strict=True)
    return torch.stack(images), torch.stack(labels)


# ---------------------------------------------------------------------------------------------- metrics


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(K, K) counts, rows = ground truth, columns = prediction; ignored pixels left out."""
    valid = label != ignore_index
    index = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(cm: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    """mIoU, mAcc, aAcc and per-class IoU in percent; undefined classes (0/0) left out of the means."""
    cm = cm.double()
    intersection = cm.diag()
    gt = cm.sum(dim=1)
    union = gt + cm.sum(dim=0) - intersection
    iou = intersection / union  # nan where union == 0
    acc = intersection / gt  # nan where the class has no ground truth
    metrics = {
        "mIoU": 100.0 * float(iou.nanmean()),
        "mAcc": 100.0 * float(acc.nanmean()),
        "aAcc": 100.0 * float(intersection.sum() / cm.sum()),
    }
    for name, value in zip(classes, iou.tolist(), strict=True):
        if not math.isnan(value):
            metrics[f"IoU_{metric_name(name)}"] = 100.0 * value
    return metrics


# ---------------------------------------------------------------------------------------------- running


@torch.no_grad()
def predict(
    model: nn.Module, image: Image.Image, cfg: SegmentationConfig, patch: int, device: torch.device
) -> torch.Tensor:
    """Whole-image inference: rescale to cfg.scale, pad to the patch grid, logits back at the original size."""
    size = rescale_size(image.width, image.height, (float(cfg.scale[0]), float(cfg.scale[1])))
    tensor = _normalise(np.asarray(image.resize(size, Image.Resampling.BILINEAR)))
    height, width = tensor.shape[1:]
    pad_h, pad_w = (-height) % patch, (-width) % patch
    batch = F.pad(tensor, (0, pad_w, 0, pad_h)).unsqueeze(0).to(device)
    with autocast(device, cfg.precision):
        logits = model(batch)
    logits = F.interpolate(logits.float(), size=batch.shape[2:], mode="bilinear", align_corners=False)
    logits = logits[:, :, :height, :width]
    logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
    return logits[0].argmax(dim=0).cpu()


def evaluate_segmentation(
    backbone: Backbone, root: Path | str, cfg: SegmentationConfig, progress: bool = False
) -> dict[str, float]:
    """Train Semantic FPN on the train split of an ADE20K-layout dataset, score the val split."""
    from tqdm import tqdm

    device = resolve_device(cfg.device)
    train_set = SemanticSegmentation(root, cfg.train_split)
    val_set = SemanticSegmentation(root, cfg.val_split)
    if train_set.classes != val_set.classes:
        raise ValueError("train and val splits name different classes")
    if cfg.crop_size % backbone.patch_size:
        raise ValueError(f"crop_size {cfg.crop_size} is not a multiple of the patch size {backbone.patch_size}")
    num_classes = train_set.num_classes
    losses_seen: list[float] = []
    start = time.perf_counter()
    with seeded(cfg.seed, device):
        model = build_semantic_fpn(backbone, num_classes, cfg).to(device)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            poly_schedule(cfg.iterations, cfg.poly_power, cfg.min_lr / cfg.lr, cfg.warmup_iters, cfg.warmup_ratio),
        )
        data = SegmentationTrainData(train_set, cfg)
        batches = endless(data, cfg.batch_size, _collate, cfg.num_workers, cfg.seed, data.set_epoch)
        model.train()
        bar = tqdm(range(cfg.iterations), desc="seg train", disable=not progress, leave=False, dynamic_ncols=True)
        for _ in bar:
            images, labels = next(batches)
            images, labels = images.to(device), labels.to(device)
            with autocast(device, cfg.precision):
                logits = model(images)
            logits = F.interpolate(logits.float(), size=labels.shape[1:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"segmentation loss is {float(loss)} at step {len(losses_seen)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
            losses_seen.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses_seen[-1]:.3f}")
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model.eval()
    n = len(val_set) if cfg.max_val_images is None else min(cfg.max_val_images, len(val_set))
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for index in tqdm(range(n), desc="seg eval", disable=not progress, leave=False, dynamic_ncols=True):
        image, label = val_set[index]
        pred = predict(model, image, cfg, backbone.patch_size, device)
        cm += confusion_matrix(pred, torch.from_numpy(label), num_classes)
    metrics: dict[str, Any] = segmentation_metrics(cm, val_set.classes)
    metrics["train_loss_last"] = float(np.mean(losses_seen[-20:]))
    metrics["train_iterations"] = float(cfg.iterations)
    metrics["val_images"] = float(n)
    metrics |= timing(train_seconds, time.perf_counter() - start, device)
    return metrics
