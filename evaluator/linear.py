"""Linear probe on frozen features (DINO's `eval_linear.py`).

Classifier Linear(D -> classes) with weights N(0, 0.01) and zero bias; SGD momentum 0.9, no weight decay,
lr = base_lr * batch / 256 with a per-epoch cosine schedule to 0. The test set is scored after every epoch
(`eval_every`): `top1` is the final epoch, `top1_best` the maximum over epochs, which is the number DINO's
script prints and the papers quote (it selects on the test set, so read it as an upper bound).

Two ways to feed the classifier:
  * `train_augment=False`: cached features of the centre-cropped training images (seconds; the tiny config);
  * `train_augment=True`: DINO's RandomResizedCrop + flip, the frozen backbone run on every batch (the full
    config, faithful to DINO; only the test features come from the cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evaluator.backbones import Backbone, PixelFeatures
from evaluator.config import FeatureSpec, LinearConfig
from evaluator.features import Extractor, FeatureCache, FeatureSet, loader, probe_features, train_augmentation


class LinearClassifier(nn.Module):
    """DINO's probe: one linear layer on flattened features."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x.flatten(1))
        return out


@torch.no_grad()
def accuracy(
    model: nn.Module, test: FeatureSet, batch_size: int = 4096, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """(top1, top5) in percent."""
    model.eval()
    correct1 = correct5 = 0
    for start in range(0, len(test), batch_size):
        logits = model(test.features[start : start + batch_size].to(device))
        targets = test.labels[start : start + batch_size].to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets.view(-1, 1)
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    return 100.0 * correct1 / len(test), 100.0 * correct5 / len(test)


def cached_batches(
    train: FeatureSet, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(train), generator=generator)
    for start in range(0, len(train), batch_size):
        index = order[start : start + batch_size]
        yield train.features[index], train.labels[index]


def augmented_batches(
    extractor: Extractor,
    dataset: Any,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    num_workers: int,
    seed: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Features of freshly augmented training images, computed by the frozen backbone."""
    for images, labels in loader(dataset, transform, batch_size, num_workers, shuffle=True, seed=seed):
        with torch.no_grad():
            features = extractor.fn(images.to(extractor.device)).float()
        yield features, labels  # outside no_grad: a generator suspended inside it would leak the mode


def train_linear(
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    test: FeatureSet,
    *,
    dim: int,
    num_classes: int,
    epochs: int,
    batch_size: int,
    base_lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eval_every: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Train the probe for `epochs`; batches(epoch) yields (features, labels) for one epoch."""
    from tqdm import tqdm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearClassifier(dim, num_classes).to(device)
    lr = base_lr * batch_size / 256.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    best1 = top1 = top5 = 0.0
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False, dynamic_ncols=True):
        model.train()
        for features, labels in batches(epoch):
            loss: torch.Tensor = F.cross_entropy(model(features.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        scheduler.step()
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            top1, top5 = accuracy(model, test, device=device)
            best1 = max(best1, top1)
    return {"top1": top1, "top5": top5, "top1_best": best1, "lr": lr}


def linear_spec(subject: Backbone | PixelFeatures, cfg: LinearConfig) -> FeatureSpec:
    """The feature choice; for [CLS] with n unset, DINO's last-4-blocks concat (at most all blocks)."""
    if (
        isinstance(subject, Backbone)
        and cfg.feature.n_last_blocks is None
        and subject.resolve(cfg.feature).pool == "cls"
    ):
        return FeatureSpec(pool="cls", n_last_blocks=min(cfg.cls_last_blocks, subject.depth))
    return cfg.feature


def run_linear(
    subject: Backbone | PixelFeatures, root: Path | str, cfg: LinearConfig, cache: FeatureCache, progress: bool = False
) -> dict[str, float]:
    """Train the probe and return top1 (final epoch), top1_best (DINO's reported max), top5."""
    spec = linear_spec(subject, cfg)
    extractor, train_split, train, test = probe_features(subject, root, cfg, cache, spec=spec, progress=progress)
    generator = torch.Generator().manual_seed(cfg.seed)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if cfg.train_augment:
            return augmented_batches(
                extractor,
                train_split.dataset,
                train_augmentation(cfg.transform),
                cfg.train_batch_size,
                cfg.num_workers,
                cfg.seed * 1000 + epoch,
            )
        return cached_batches(train, cfg.train_batch_size, generator)

    result = train_linear(
        batches,
        test,
        dim=int(train.features.shape[1]),
        num_classes=train_split.num_classes,
        epochs=cfg.epochs,
        batch_size=cfg.train_batch_size,
        base_lr=cfg.base_lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
        device=extractor.device,
        progress=progress,
    )
    result["train_images"] = float(len(train))
    result["test_images"] = float(len(test))
    result["feature_dim"] = float(train.features.shape[1])
    return result
