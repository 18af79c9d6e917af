"""Patch-level probes of frozen features: what SelfPatch changes is the patch tokens, so score them directly.

Both probes read the same cached per-patch features: the last block's patch tokens after the final norm
(DINO; SelfPatch has none), or the last n blocks concatenated, of images resized and centre-cropped so
every image gives the same grid; the label maps get the same geometry (nearest). Raw pixels, patchified at
`pixel_patch_size`, are the floor a backbone must beat (as is a random init of its shape).

  * `dense_linear` (DINOv2-style linear segmentation): channels standardised with train statistics, one
    linear layer per patch, logits bilinearly upsampled to the label resolution, cross-entropy with ignore
    index 255, AdamW with poly decay after a linear warm-up; seeded init and data order.
  * `knn_seg`: every train patch gets the majority non-ignore class of its pixels (mostly-ignore patches
    are left out), the bank is subsampled with a seeded generator when too large, and each validation
    patch takes the exp(sim / T)-weighted vote of its k nearest bank patches (cosine), then its pixels.

Both are scored by the confusion-matrix mIoU / mAcc / aAcc of the segmentation benchmark (percent).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from evaluator.backbones import Backbone, PixelFeatures
from evaluator.config import DenseLinearConfig, ImageTransform, KnnSegConfig, PatchProbeConfig
from evaluator.datasets import IGNORE_INDEX, SemanticSegmentation
from evaluator.dense import poly_schedule, resolve_device, seeded
from evaluator.features import Extractor, FeatureCache, FeatureSet
from evaluator.segmentation import confusion_matrix, segmentation_metrics

__all__ = [
    "PatchSplit",
    "dense_linear_confusion",
    "knn_seg_confusion",
    "patch_extractor",
    "patch_features",
    "patch_labels",
    "pixel_confusion",
    "run_dense_linear",
    "run_knn_seg",
]

# ------------------------------------------------------------------------------------------- data


class PatchSplit(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A (subset of a) segmentation split as (normalised image, uint8 label map) at one fixed geometry."""

    def __init__(
        self, dataset: SemanticSegmentation, transform: ImageTransform, limit: int | None = None, seed: int = 0
    ) -> None:
        if transform.crop > transform.resize:
            raise ValueError(f"crop {transform.crop} exceeds resize {transform.resize}: labels would be padded")
        if dataset.num_classes > IGNORE_INDEX:
            raise ValueError(f"{dataset.num_classes} classes do not fit uint8 label maps with ignore {IGNORE_INDEX}")
        self.dataset, self.transform = dataset, transform
        self.index = list(range(len(dataset)))
        if limit is not None and limit < len(self.index):
            generator = torch.Generator().manual_seed(seed)
            self.index = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
        listing = "\n".join(
            f"{image.name}:{image.stat().st_size}:{label.stat().st_size}"
            for image, label in (dataset.pairs[i] for i in self.index)
        )
        header = f"{dataset.classes}|{dataset.reduce_zero_label}|{dataset.ignore_index}"
        digest = hashlib.sha256(f"{header}\n{listing}".encode()).hexdigest()[:16]
        self.dataset_id = f"ade:{dataset.image_dir.name}:{len(self.index)}:{digest}"

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.dataset[self.index[index]]
        spec = self.transform
        mode = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
        image = TF.center_crop(TF.resize(image, spec.resize, interpolation=mode), [spec.crop])
        label_image = TF.resize(
            Image.fromarray(label.astype(np.uint8)), spec.resize, interpolation=InterpolationMode.NEAREST
        )
        label_image = TF.center_crop(label_image, [spec.crop])
        tensor = TF.normalize(TF.to_tensor(image), list(spec.mean), list(spec.std))
        return tensor, torch.from_numpy(np.asarray(label_image, dtype=np.uint8).copy())


# ------------------------------------------------------------------------------------------- features


def patch_features(backbone: Backbone, images: torch.Tensor, n_last_blocks: int = 1) -> torch.Tensor:
    """(B, h, w, D * n) patch tokens of the last n blocks, each after the final norm where the ViT has one."""
    if n_last_blocks > backbone.depth:
        raise ValueError(f"n_last_blocks ({n_last_blocks}) exceeds the backbone depth ({backbone.depth})")
    outputs: list[torch.Tensor] = backbone.vit.forward_intermediates(  # type: ignore[assignment]
        images, indices=n_last_blocks, norm=True, output_fmt="NLC", intermediates_only=True
    )
    grid = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
    tokens = torch.cat(outputs, dim=-1)
    return tokens.reshape(images.shape[0], grid[0], grid[1], tokens.shape[-1])


def pixel_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, h, w, 3 p^2) raw normalised pixels of each p x p patch: the probes' floor."""
    return F.pixel_unshuffle(images, patch_size).permute(0, 2, 3, 1).contiguous()


def patch_extractor(subject: Backbone | PixelFeatures, cfg: PatchProbeConfig, device: torch.device) -> Extractor:
    """The cacheable per-patch feature function of a backbone or of raw pixels, and its patch size."""
    crop = cfg.transform.crop
    if isinstance(subject, PixelFeatures):
        patch = cfg.pixel_patch_size
        identity = f"{subject.identity}|patchify{patch}"

        def fn(images: torch.Tensor) -> torch.Tensor:
            return pixel_patches(images, patch)

    else:
        backbone = subject.to(device)
        patch = backbone.patch_size
        identity = f"{backbone.identity}|patch-tokens:last{cfg.n_last_blocks}:normed"

        def fn(images: torch.Tensor) -> torch.Tensor:
            return patch_features(backbone, images, cfg.n_last_blocks)

    if crop % patch:
        raise ValueError(f"crop {crop} is not a multiple of the patch size {patch}")
    return Extractor(f"{identity}|{cfg.feature_dtype}", fn, device)


@torch.no_grad()
def _extract(extractor: Extractor, split: PatchSplit, cfg: PatchProbeConfig, progress: bool, desc: str) -> FeatureSet:
    from tqdm import tqdm

    dtype = torch.float16 if cfg.feature_dtype == "float16" else torch.float32
    batches = DataLoader(split, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    feats, labels = [], []
    for images, targets in tqdm(batches, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        out = extractor.fn(images.to(extractor.device)).float()
        if not torch.isfinite(out).all() or (dtype == torch.float16 and out.abs().max() > 65000):
            raise FloatingPointError(f"patch features are not finite in {cfg.feature_dtype}; use feature_dtype=float32")
        feats.append(out.to(dtype).cpu())
        labels.append(targets)
    return FeatureSet(torch.cat(feats), torch.cat(labels))


def cached_patch_features(
    extractor: Extractor, split: PatchSplit, cfg: PatchProbeConfig, cache: FeatureCache, progress: bool, desc: str
) -> FeatureSet:
    """Features (N, h, w, D) and label maps (N, H, W) uint8 of a split, through the probes' feature cache."""
    key = cache.key(f"{extractor.identity}|dense-patches", split.dataset_id, cfg.transform)
    cached = cache.load(key)
    crop = cfg.transform.crop
    if cached is not None and len(cached) == len(split) and tuple(cached.labels.shape[1:]) == (crop, crop):
        cache.stats.hits += 1
        return cached
    cache.stats.misses += 1
    start = time.perf_counter()
    features = _extract(extractor, split, cfg, progress, desc)
    cache.stats.seconds_computing += time.perf_counter() - start
    cache.stats.computed_images += len(features)
    meta = {
        "extractor": extractor.identity,
        "dataset": split.dataset_id,
        "transform": cfg.transform.model_dump(),
        "n": len(features),
        "shape": list(features.features.shape),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    cache.store(key, features, meta)
    return features


def _splits(
    subject: Backbone | PixelFeatures, root: Path | str, cfg: PatchProbeConfig, cache: FeatureCache, progress: bool
) -> tuple[torch.device, list[str], FeatureSet, FeatureSet]:
    device = resolve_device(cfg.device)
    train_set = SemanticSegmentation(root, cfg.train_split)
    val_set = SemanticSegmentation(root, cfg.val_split)
    if train_set.classes != val_set.classes:
        raise ValueError("train and val splits name different classes")
    extractor = patch_extractor(subject, cfg, device)
    train_split = PatchSplit(train_set, cfg.transform, cfg.max_train_images, cfg.seed)
    val_split = PatchSplit(val_set, cfg.transform, cfg.max_val_images, cfg.seed)
    train = cached_patch_features(extractor, train_split, cfg, cache, progress, "train patches")
    val = cached_patch_features(extractor, val_split, cfg, cache, progress, "val patches")
    if cfg.labels == "foreground":
        return device, list(FOREGROUND_CLASSES), foreground(train), foreground(val)
    return device, val_set.classes, train, val


#: The two classes of `labels=foreground`: class 0 of the data set, and every other class merged.
FOREGROUND_CLASSES = ("background", "object")


def _labelled(metrics: dict[str, float], cfg: PatchProbeConfig) -> dict[str, float]:
    """Summary scores of `labels=foreground` are named fg_mIoU, fg_mAcc, fg_aAcc, so one sweep can report both
    labellings of a probe side by side."""
    if cfg.labels == "classes":
        return metrics
    return {f"fg_{k}" if k in ("mIoU", "mAcc", "aAcc") else k: v for k, v in metrics.items()}


def foreground(features: FeatureSet) -> FeatureSet:
    """The same features with every non-background, non-ignore class merged into class 1: whether patches
    separate objects from their scene, whatever the objects are (the cache keeps the original labels)."""
    labels = features.labels
    merged = torch.where((labels > 0) & (labels != IGNORE_INDEX), torch.ones_like(labels), labels)
    return FeatureSet(features.features, merged)


# -------------------------------------------------------------------------------------------- scoring


def pixel_confusion(patch_pred: torch.Tensor, labels: torch.Tensor, num_classes: int, chunk: int = 64) -> torch.Tensor:
    """Confusion matrix of patch predictions (M, h, w) repeated over their pixels against labels (M, H, W)."""
    height, width = labels.shape[1:]
    if height % patch_pred.shape[1] or width % patch_pred.shape[2]:
        raise ValueError(f"label maps {height}x{width} are not a whole patch grid {tuple(patch_pred.shape[1:])}")
    ry, rx = height // patch_pred.shape[1], width // patch_pred.shape[2]
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(labels), chunk):
        pred = patch_pred[start : start + chunk].cpu().repeat_interleave(ry, dim=1).repeat_interleave(rx, dim=2)
        cm += confusion_matrix(pred, labels[start : start + chunk].long(), num_classes)
    return cm


# -------------------------------------------------------------------------------------------- dense_linear


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Image indices forever, a fresh seeded permutation per pass."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - min(batch_size, n) + 1, batch_size):
            yield order[start : start + batch_size]


def _channel_stats(features: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (float64 sums, chunked) over every patch of (N, h, w, D) features."""
    dim = features.shape[-1]
    total, squares, count = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
    for start in range(0, len(features), chunk):
        block = features[start : start + chunk].reshape(-1, dim).double()
        total += block.sum(dim=0)
        squares += (block * block).sum(dim=0)
        count += block.shape[0]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def _logits(
    head: nn.Linear, features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """(B, K, H, W) logits of (B, h, w, D) features, bilinearly upsampled to the label size."""
    out: torch.Tensor = head((features.float() - mean) / std)
    return F.interpolate(out.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)


def dense_linear_confusion(
    train: FeatureSet,
    val: FeatureSet,
    num_classes: int,
    cfg: DenseLinearConfig,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Train the linear patch classifier on `train`, return the val confusion matrix and the train losses."""
    from tqdm import tqdm

    device = torch.device(device)
    dim = train.features.shape[-1]
    size = (int(train.labels.shape[1]), int(train.labels.shape[2]))
    if cfg.standardize:
        mean, std = _channel_stats(train.features)
    else:
        mean, std = torch.zeros(dim), torch.ones(dim)
    mean, std = mean.to(device), std.to(device)
    losses: list[float] = []
    with seeded(cfg.seed, device):
        head = nn.Linear(dim, num_classes).to(device)
        nn.init.normal_(head.weight, 0.0, 0.01)
        nn.init.zeros_(head.bias)
        optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, poly_schedule(cfg.iterations, cfg.poly_power, 0.0, cfg.warmup_iters, cfg.warmup_ratio)
        )
        batches = _batches(len(train), cfg.train_batch_size, torch.Generator().manual_seed(cfg.seed))
        bar = tqdm(range(cfg.iterations), desc="dense_linear", disable=not progress, leave=False, dynamic_ncols=True)
        for step in bar:
            index = next(batches)
            labels = train.labels[index].to(device).long()
            logits = _logits(head, train.features[index].to(device), mean, std, size)
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                if bool((labels == IGNORE_INDEX).all()):
                    continue  # a batch of ignore pixels only teaches nothing
                raise FloatingPointError(f"dense_linear loss is {float(loss)} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, len(val), cfg.train_batch_size):
            logits = _logits(head, val.features[start : start + cfg.train_batch_size].to(device), mean, std, size)
            labels = val.labels[start : start + cfg.train_batch_size]
            cm += confusion_matrix(logits.argmax(dim=1).cpu(), labels.long(), num_classes)
    return cm, losses


def run_dense_linear(
    subject: Backbone | PixelFeatures,
    root: Path | str,
    cfg: DenseLinearConfig,
    cache: FeatureCache,
    progress: bool = False,
) -> dict[str, float]:
    """Linear segmentation on cached patch features: mIoU, mAcc, aAcc, per-class IoU (percent)."""
    feature_seconds = cache.stats.seconds_computing
    device, classes, train, val = _splits(subject, root, cfg, cache, progress)
    start = time.perf_counter()
    cm, losses = dense_linear_confusion(train, val, len(classes), cfg, device, progress)
    extra = {"train_loss_last": float(np.mean(losses[-20:])) if losses else math.nan}
    extra["train_iterations"] = float(cfg.iterations)
    return _scores(
        cm, classes, cfg, extra, (len(train), len(val)), cache.stats.seconds_computing - feature_seconds, start
    )


# -------------------------------------------------------------------------------------------- knn_seg


def patch_labels(
    labels: torch.Tensor, grid: tuple[int, int], num_classes: int, max_ignore_fraction: float, chunk: int = 64
) -> torch.Tensor:
    """(N, h, w) majority non-ignore class of each patch's pixels; -1 where ignore covers more than allowed.

    Ties go to the lower class index, so the labels are deterministic.
    """
    n, height, width = labels.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"label maps {height}x{width} are not a whole patch grid {grid}")
    ry, rx = height // h, width // w
    out = torch.empty(n, h, w, dtype=torch.int64)
    for start in range(0, n, chunk):
        block = labels[start : start + chunk].long()
        block = torch.where(block == IGNORE_INDEX, num_classes, block)  # the ignore bin
        m = block.shape[0]
        pixels = block.reshape(m, h, ry, w, rx).permute(0, 1, 3, 2, 4).reshape(m * h * w, ry * rx)
        counts = torch.zeros(m * h * w, num_classes + 1, dtype=torch.int64)
        counts.scatter_add_(1, pixels, torch.ones_like(pixels))
        majority = counts[:, :num_classes].argmax(dim=1)
        ignored = counts[:, num_classes].double() / (ry * rx)
        keep = (ignored <= max_ignore_fraction) & (ignored < 1.0)
        out[start : start + m] = torch.where(keep, majority, -1).reshape(m, h, w)
    return out


@torch.no_grad()
def knn_seg_confusion(
    train: FeatureSet,
    val: FeatureSet,
    num_classes: int,
    cfg: KnnSegConfig,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Label every val patch by the weighted vote of its k nearest train patches; the val confusion matrix.

    Also returns the bank sizes (`train_patches` kept after the ignore rule, `bank_patches` after subsampling).
    """
    device = torch.device(device)
    _, h, w, dim = train.features.shape
    targets = patch_labels(train.labels, (h, w), num_classes, cfg.max_ignore_fraction).reshape(-1)
    kept = torch.nonzero(targets >= 0).squeeze(1)
    if len(kept) == 0:
        raise ValueError("no train patch has a label: every patch is mostly ignore pixels")
    train_patches = len(kept)
    if cfg.max_bank_patches is not None and len(kept) > cfg.max_bank_patches:
        generator = torch.Generator().manual_seed(cfg.seed)
        kept = kept[torch.randperm(len(kept), generator=generator)[: cfg.max_bank_patches].sort().values]
    bank = F.normalize(train.features.reshape(-1, dim)[kept].to(device).float(), dim=1)
    bank_labels = targets[kept].to(device)
    k = min(cfg.k, len(kept))
    queries = val.features.reshape(-1, val.features.shape[-1])
    if queries.shape[1] != dim:
        raise ValueError(f"feature sizes differ: train {dim}, val {queries.shape[1]}")
    pred = torch.empty(len(queries), dtype=torch.int64)
    for start in range(0, len(queries), cfg.query_chunk):
        block = F.normalize(queries[start : start + cfg.query_chunk].to(device).float(), dim=1)
        similarity, index = (block @ bank.T).topk(k, dim=1, largest=True, sorted=True)
        votes = torch.zeros(len(block), num_classes, device=device)
        votes.scatter_add_(1, bank_labels[index], (similarity / cfg.temperature).exp())
        pred[start : start + len(block)] = votes.argmax(dim=1).cpu()
    cm = pixel_confusion(pred.reshape(len(val), h, w), val.labels, num_classes)
    return cm, {"train_patches": float(train_patches), "bank_patches": float(len(kept))}


def run_knn_seg(
    subject: Backbone | PixelFeatures,
    root: Path | str,
    cfg: KnnSegConfig,
    cache: FeatureCache,
    progress: bool = False,
) -> dict[str, float]:
    """k-NN segmentation on cached patch features: mIoU, mAcc, aAcc, per-class IoU (percent)."""
    feature_seconds = cache.stats.seconds_computing
    device, classes, train, val = _splits(subject, root, cfg, cache, progress)
    start = time.perf_counter()
    cm, sizes = knn_seg_confusion(train, val, len(classes), cfg, device)
    extra = sizes | {"k": float(cfg.k)}
    return _scores(
        cm, classes, cfg, extra, (len(train), len(val)), cache.stats.seconds_computing - feature_seconds, start
    )


def _scores(
    cm: torch.Tensor,
    classes: list[str],
    cfg: PatchProbeConfig,
    extra: dict[str, float],
    images: tuple[int, int],
    feature_seconds: float,
    start: float,
) -> dict[str, float]:
    """What both probes report: the confusion matrix's scores, the probe's own numbers, sizes and timings."""
    metrics = _labelled(segmentation_metrics(cm, classes), cfg) | extra
    metrics["train_images"], metrics["val_images"] = float(images[0]), float(images[1])
    metrics["feature_seconds"] = feature_seconds
    metrics["probe_seconds"] = time.perf_counter() - start
    return metrics
