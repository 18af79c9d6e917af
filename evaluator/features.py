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
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from evaluator.backbones import Backbone, FeatureSpec, PixelFeatures
from evaluator.datasets import ClassificationSplit, classification_split
from evaluator.dense import resolve_device
from trainer.files import atomic_write

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTransform(BaseModel):
    """Test-time transform: resize the short side, centre-crop, normalise (DINO: 256 / 224, bicubic)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: int = Field(256, ge=1, description="Short side after resizing.")
    crop: int = Field(224, ge=1, description="Centre-crop side (a multiple of the patch size).")
    interpolation: Literal["bicubic", "bilinear"] = Field("bicubic", description="Resize interpolation.")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def build(self) -> transforms.Compose:
        mode = (
            transforms.InterpolationMode.BICUBIC
            if self.interpolation == "bicubic"
            else transforms.InterpolationMode.BILINEAR
        )
        return transforms.Compose(
            [
                transforms.Resize(self.resize, interpolation=mode),
                transforms.CenterCrop(self.crop),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def train_augmentation(self) -> transforms.Compose:
        """DINO's linear-probe training augmentation: RandomResizedCrop + flip."""
        mode = (
            transforms.InterpolationMode.BICUBIC
            if self.interpolation == "bicubic"
            else transforms.InterpolationMode.BILINEAR
        )
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(self.crop, interpolation=mode),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )


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
            transform.build(),
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


class ProbeConfig(BaseModel):
    """What the k-NN and linear probes read: data, subsets, transform, feature choice."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: FeatureSpec = Field(default_factory=lambda: FeatureSpec(), description="Image feature to probe.")
    transform: ImageTransform = Field(default_factory=lambda: ImageTransform())
    train_split: str = Field("train", description="Labelled split the probe learns from.")
    test_split: str = Field("val", description="Split it is scored on (Fashion-MNIST: the test files).")
    max_train_samples: int | None = Field(None, ge=1, description="Seeded random subset of the train split.")
    max_test_samples: int | None = Field(None, ge=1, description="Seeded random subset of the test split.")
    batch_size: int = Field(256, ge=1, description="Images per forward pass while extracting.")
    num_workers: int = Field(2, ge=0, description="DataLoader workers while extracting.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0, description="Seeds the subsets and the probe.")


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
