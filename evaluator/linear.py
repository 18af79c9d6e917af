"""Linear probe on frozen features (DINO's `eval_linear.py`).

Classifier Linear(D -> classes) with weights N(0, 0.01) and zero bias; SGD momentum 0.9, no weight decay,
lr = base_lr * batch / 256 with a per-epoch cosine schedule to 0. The test set is scored after every epoch
(`eval_every`): `top1` is the final epoch, `top1_best` the maximum over epochs, which is the number DINO's
script prints and the papers quote (it selects on the test set, so read it as an upper bound).

Two ways to feed the classifier:
  * `train_augment=False`: cached features of the centre-cropped training images (seconds; the tiny config);
  * `train_augment=True`: DINO's RandomResizedCrop + flip, the frozen backbone run on every batch (the full
    config, faithful to DINO; only the test features come from the cache).

`protocol="lbfgs"` replaces the SGD probe by the CLIP / DINOv2-v3 protocol on cached features: full-batch
L-BFGS multinomial logistic regression, its L2 strength chosen on a seeded held-out part of the training
features, then refit on all of them. On cached features SGD only approximates this convex problem (without
a penalty, at a hand-set lr, and `top1_best` selects on the test set); L-BFGS solves it and selects nothing on
the test set. The fits walk the grid from strong to weak L2, each warm-started from the previous solution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evaluator.backbones import Backbone, PixelFeatures
from evaluator.config import FeatureSpec, LbfgsConfig, LinearConfig
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


@dataclass
class LogReg:
    """A multinomial logistic regression on raw features: logits = x @ weight.T + bias (standardisation folded in)."""

    weight: torch.Tensor  # (C, D), as nn.Linear stores it
    bias: torch.Tensor  # (C,)
    iterations: int

    def module(self) -> nn.Module:
        """The classifier as a Linear layer (what `accuracy` scores)."""
        layer = nn.Linear(self.weight.shape[1], self.weight.shape[0]).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        return layer


def fit_logreg(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    cfg: LbfgsConfig,
    init: LogReg | None = None,
) -> LogReg:
    """Minimise mean cross-entropy + l2/2 ||W||^2 with full-batch L-BFGS (strong-Wolfe line search).

    The gradient is written out (softmax - one-hot) instead of taken by autograd, in a classes x samples
    layout: one closure call is two GEMMs with a long inner dimension and a softmax over a contiguous axis,
    several times faster on CPU than the samples x classes layout (whose 10-wide softmax and GEMM are slow).
    `init` warm-starts from a solution in the same (raw-feature) coordinates.
    """
    x = features
    n = x.shape[0]
    mean = x.mean(0) if cfg.standardize else torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
    std = x.std(0).clamp_min(1e-6) if cfg.standardize else torch.ones_like(mean)
    x = (x - mean) / std
    target = labels.view(1, n)
    minus_one = torch.full((1, n), -1.0, device=x.device, dtype=x.dtype)
    if init is None:
        weight = torch.zeros(num_classes, x.shape[1], device=x.device, dtype=x.dtype)
        bias = torch.zeros(num_classes, device=x.device, dtype=x.dtype)
    else:  # raw -> standardised coordinates: W_std = W_raw * std, b_std = b_raw + W_raw @ mean
        weight = (init.weight * std).clone()
        bias = (init.bias + init.weight @ mean).clone()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=cfg.max_iter,
        max_eval=cfg.max_iter * 2,
        tolerance_grad=cfg.tolerance_grad,
        tolerance_change=1e-12,
        history_size=cfg.history_size,
        line_search_fn="strong_wolfe",
    )

    def closure() -> float:
        with torch.no_grad():
            log_p = torch.addmm(bias[:, None], weight, x.T).log_softmax(0)  # (C, N)
            loss = -log_p.gather(0, target).sum() / n + 0.5 * l2 * weight.pow(2).sum()
            residual = log_p.exp_().scatter_add_(0, target, minus_one).div_(n)  # softmax - one-hot
            weight.grad = torch.addmm(weight, residual, x, beta=l2)
            bias.grad = residual.sum(1)
        return float(loss)

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    raw_weight = weight / std  # fold the standardisation back into the classifier
    return LogReg(raw_weight, bias - raw_weight @ mean, iterations)


def lbfgs_probe(
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    cfg: LbfgsConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Choose the L2 strength on a held-out split of `train`, refit on all of `train`, score `test`."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)
    n_val = max(1, round(cfg.val_fraction * len(train)))
    if n_val >= len(train):
        raise ValueError(f"{len(train)} training features leave nothing to fit after holding out {n_val}")
    x = train.features.to(device=device, dtype=torch.float32)
    y = train.labels.to(device)
    val_index, fit_index = order[:n_val].to(device), order[n_val:].to(device)
    fit = FeatureSet(x[fit_index], y[fit_index])
    val = FeatureSet(x[val_index], y[val_index])

    best: tuple[float, float, LogReg] | None = None  # (val top1, l2, solution)
    previous: LogReg | None = None
    iterations = 0
    for l2 in sorted(cfg.l2_grid, reverse=True):  # strong -> weak: each fit starts near its answer
        previous = fit_logreg(fit.features, fit.labels, num_classes, l2, cfg, init=previous)
        iterations += previous.iterations
        val_top1, _ = accuracy(previous.module(), val, device=device)
        if best is None or val_top1 > best[0]:  # ties keep the stronger penalty (the simpler model)
            best = (val_top1, l2, previous)
    assert best is not None
    val_top1, l2, chosen = best
    final = fit_logreg(x, y, num_classes, l2, cfg, init=chosen)
    top1, top5 = accuracy(final.module(), test, device=device)
    return {
        "top1": top1,
        "top5": top5,
        "l2": l2,
        "C": 1.0 / (l2 * len(train)),  # the same strength in scikit-learn's units
        "val_top1": val_top1,
        "val_images": float(n_val),
        "grid_size": float(len(cfg.l2_grid)),
        "iterations": float(iterations + final.iterations),
    }


def run_linear(
    subject: Backbone | PixelFeatures, root: Path | str, cfg: LinearConfig, cache: FeatureCache, progress: bool = False
) -> dict[str, float]:
    """Fit the probe; SGD: top1 (final epoch), top1_best (DINO's reported max), top5; L-BFGS: top1, top5, l2."""
    spec = linear_spec(subject, cfg)
    extractor, train_split, train, test = probe_features(subject, root, cfg, cache, spec=spec, progress=progress)
    if cfg.protocol == "lbfgs":
        result = lbfgs_probe(train, test, train_split.num_classes, cfg.lbfgs, seed=cfg.seed, device=extractor.device)
    else:
        result = sgd_probe(extractor, train_split.dataset, train, test, train_split.num_classes, cfg, progress)
    result["train_images"] = float(len(train))
    result["test_images"] = float(len(test))
    result["feature_dim"] = float(train.features.shape[1])
    return result


def sgd_probe(
    extractor: Extractor,
    dataset: Any,
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    cfg: LinearConfig,
    progress: bool = False,
) -> dict[str, float]:
    """DINO's SGD probe on cached features, or on freshly augmented images when `train_augment`."""
    generator = torch.Generator().manual_seed(cfg.seed)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if cfg.train_augment:
            return augmented_batches(
                extractor,
                dataset,
                train_augmentation(cfg.transform),
                cfg.train_batch_size,
                cfg.num_workers,
                cfg.seed * 1000 + epoch,
            )
        return cached_batches(train, cfg.train_batch_size, generator)

    return train_linear(
        batches,
        test,
        dim=int(train.features.shape[1]),
        num_classes=num_classes,
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
