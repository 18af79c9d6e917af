"""Frozen-feature extraction with an on-disk cache, so repeated probes never recompute features.

A cache entry is keyed by sha256(extractor identity + dataset id + transform + format version): the
extractor identity holds the checkpoint's sha256 and the feature choice (pool, n_last_blocks), the dataset
id holds a digest of the files. Entries are written to a temporary file and renamed (atomic); an unreadable
entry is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from evaluator.backbones import Backbone, PixelFeatures
from evaluator.config import FeatureSpec, ImageTransform, ProbeConfig
from evaluator.datasets import ClassificationSplit, classification_split
from evaluator.dense import resolve_device
from trainer.files import atomic_write

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def eval_transform(spec: ImageTransform) -> transforms.Compose:
    """The test-time transform a config describes: resize the short side, centre-crop, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(spec.resize, interpolation=_interpolation(spec)),
            transforms.CenterCrop(spec.crop),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


def train_augmentation(spec: ImageTransform) -> transforms.Compose:
    """DINO's linear-probe training augmentation: RandomResizedCrop + flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(spec.crop, interpolation=_interpolation(spec)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


def _interpolation(spec: ImageTransform) -> transforms.InterpolationMode:
    if spec.interpolation == "bicubic":
        return transforms.InterpolationMode.BICUBIC
    return transforms.InterpolationMode.BILINEAR


@dataclass
class FeatureSet:
    """Features (N, D) float32 on the CPU and their labels (N,) int64."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    computed_images: int = 0
    seconds_computing: float = 0.0


@dataclass
class Extractor:
    """A batch -> features function and the identity that makes its outputs cacheable."""

    identity: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class _Transformed(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, dataset: Dataset[tuple[Any, int]], transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


def loader(
    dataset: Dataset[tuple[Any, int]],
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        _Transformed(dataset, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=False,
    )


@torch.no_grad()
def extract(
    extractor: Extractor,
    dataset: Dataset[tuple[Any, int]],
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> FeatureSet:
    """Run the extractor over a dataset in order."""
    from tqdm import tqdm

    feats, labels = [], []
    batches = loader(dataset, transform, batch_size, num_workers)
    for images, targets in tqdm(batches, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        out = extractor.fn(images.to(extractor.device, non_blocking=True))
        feats.append(out.float().cpu())
        labels.append(targets)
    if not feats:
        raise ValueError("cannot extract features from an empty dataset")
    return FeatureSet(torch.cat(feats), torch.cat(labels).long())


class FeatureCache:
    """Feature sets on disk under `root`; root=None disables caching (every call computes)."""

    def __init__(self, root: Path | str | None) -> None:
        self.root = Path(root) if root is not None else None
        self.stats = CacheStats()

    @staticmethod
    def key(extractor_id: str, dataset_id: str, transform: ImageTransform) -> str:
        payload = json.dumps(
            {
                "format": CACHE_FORMAT,
                "extractor": extractor_id,
                "dataset": dataset_id,
                "transform": transform.model_dump(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / key[:2] / f"{key}.pt"

    def load(self, key: str) -> FeatureSet | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return FeatureSet(data["features"], data["labels"])
        except Exception as exc:  # a damaged entry is only a cache miss
            log.warning("feature cache entry %s is unreadable (%s); recomputing", path, exc)
            return None

    def store(self, key: str, features: FeatureSet, meta: dict[str, Any]) -> None:
        path = self.path(key)
        if path is None:
            return
        payload = {"features": features.features.contiguous(), "labels": features.labels, "meta": json.dumps(meta)}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    def get(
        self,
        extractor: Extractor,
        split: ClassificationSplit,
        transform: ImageTransform,
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        progress: bool = False,
        desc: str = "features",
    ) -> FeatureSet:
        """Cached features of `split`, computing and storing them on a miss."""
        key = self.key(extractor.identity, split.dataset_id, transform)
        cached = self.load(key)
        if cached is not None and len(cached) == len(split):
            self.stats.hits += 1
            return cached
        self.stats.misses += 1
        start = time.perf_counter()
        features = extract(
            extractor,
            split.dataset,
            eval_transform(transform),
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
            desc=desc,
        )
        self.stats.seconds_computing += time.perf_counter() - start
        self.stats.computed_images += len(features)
        meta = {
            "extractor": extractor.identity,
            "dataset": split.dataset_id,
            "transform": transform.model_dump(),
            "n": len(features),
            "dim": int(features.features.shape[1]),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.store(key, features, meta)
        return features


# ------------------------------------------------------------------------------------ probes (k-NN, linear)


def make_extractor(subject: Backbone | PixelFeatures, spec: FeatureSpec, device: torch.device) -> Extractor:
    """The cacheable feature function of a backbone (with its resolved feature choice) or of raw pixels."""
    if isinstance(subject, PixelFeatures):
        return Extractor(subject.identity, subject, device)
    resolved = subject.resolve(spec)
    subject.to(device)
    return Extractor(
        f"{subject.identity}|{resolved.model_dump_json()}", lambda x: subject.image_features(x, resolved), device
    )


def probe_features(
    subject: Backbone | PixelFeatures,
    root: Path | str,
    cfg: ProbeConfig,
    cache: FeatureCache,
    *,
    spec: FeatureSpec | None = None,
    progress: bool = False,
) -> tuple[Extractor, ClassificationSplit, FeatureSet, FeatureSet]:
    """Extractor, train split, and the cached (train, test) features of a probe."""
    device = resolve_device(cfg.device)
    extractor = make_extractor(subject, spec or cfg.feature, device)
    train_split = classification_split(root, cfg.train_split).subset(cfg.max_train_samples, cfg.seed)
    test_split = classification_split(root, cfg.test_split).subset(cfg.max_test_samples, cfg.seed)
    if train_split.num_classes != test_split.num_classes:
        raise ValueError(f"train has {train_split.num_classes} classes, test {test_split.num_classes}")

    def get(split: ClassificationSplit, desc: str) -> FeatureSet:
        return cache.get(
            extractor,
            split,
            cfg.transform,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            progress=progress,
            desc=desc,
        )

    train, test = get(train_split, "train features"), get(test_split, "test features")
    return extractor, train_split, train, test
