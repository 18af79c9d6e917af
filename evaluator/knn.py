"""Weighted k-NN classification on frozen features, as DINO's `eval_knn.py` does it.

Features are L2-normalised, similarity is the cosine, each of the k nearest training images votes for its
class with weight exp(sim / T), T = 0.07. The k-nearest lists of all k come from one top-max(k) search:
a sorted top-k is a prefix of a sorted top-K for K >= k, so the numbers equal separate runs per k.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from evaluator.backbones import Backbone, PixelFeatures
from evaluator.config import KnnConfig
from evaluator.features import FeatureCache, FeatureSet, probe_features


class KnnResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    k: int
    top1: float = Field(description="Top-1 accuracy in percent.")
    top5: float = Field(description="Top-5 accuracy in percent.")


@torch.no_grad()
def knn_classify(
    train: FeatureSet,
    test: FeatureSet,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
) -> list[KnnResult]:
    """Top-1/top-5 accuracy (percent) of the temperature-weighted k-NN vote for every k in `ks`."""
    if not ks or min(ks) < 1:
        raise ValueError(f"k values must be positive, got {list(ks)}")
    if len(train) == 0 or len(test) == 0:
        raise ValueError("k-NN needs non-empty train and test features")
    if train.features.shape[1] != test.features.shape[1]:
        raise ValueError(f"feature sizes differ: train {train.features.shape[1]}, test {test.features.shape[1]}")
    classes = num_classes or int(max(train.labels.max(), test.labels.max())) + 1
    bank = F.normalize(train.features.to(device).float(), dim=1)
    bank_labels = train.labels.to(device)
    k_max = min(max(ks), len(train))
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    for start in range(0, len(test), chunk):
        queries = F.normalize(test.features[start : start + chunk].to(device).float(), dim=1)
        targets = test.labels[start : start + chunk].to(device)
        similarity, index = (queries @ bank.T).topk(k_max, dim=1, largest=True, sorted=True)
        neighbours = bank_labels[index]  # (B, k_max)
        weights = (similarity / temperature).exp()
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(targets), classes, device=device)
            votes.scatter_add_(1, neighbours[:, :kk], weights[:, :kk])
            ranked = votes.argsort(dim=1, descending=True)
            hits = ranked[:, : min(5, classes)] == targets.view(-1, 1)
            correct1[k] += int(hits[:, 0].sum())
            correct5[k] += int(hits.any(dim=1).sum())
    total = len(test)
    return [KnnResult(k=k, top1=100.0 * correct1[k] / total, top5=100.0 * correct5[k] / total) for k in ks]


def run_knn(
    subject: Backbone | PixelFeatures, root: Path | str, cfg: KnnConfig, cache: FeatureCache, progress: bool = False
) -> dict[str, float]:
    """k-NN top-1/top-5 for every k, as flat metrics (`top1_k20`, ...)."""
    extractor, train_split, train, test = probe_features(subject, root, cfg, cache, progress=progress)
    results = knn_classify(
        train, test, cfg.ks, cfg.temperature, num_classes=train_split.num_classes, device=extractor.device
    )
    metrics: dict[str, float] = {}
    for result in results:
        metrics[f"top1_k{result.k}"] = result.top1
        metrics[f"top5_k{result.k}"] = result.top5
    metrics["train_images"] = float(len(train))
    metrics["test_images"] = float(len(test))
    return metrics
