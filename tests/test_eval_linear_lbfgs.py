"""The L-BFGS logistic-regression protocol of the linear benchmark: exactness, held-out selection, determinism."""

from __future__ import annotations

import pytest
import torch

from evaluator.benchmarks import BENCHMARKS, evaluate
from evaluator.config import LbfgsConfig, LinearConfig
from evaluator.features import FeatureSet
from evaluator.linear import fit_logreg, lbfgs_probe
from tests.conftest import FASHION_MNIST
from tests.eval_support import clusters
from trainer.presets import ConfigError


def _nuisance(n: int, seed: int, shuffle_labels: bool = False) -> FeatureSet:
    """Two classes: x0 = signal + large noise, x1 = the same noise. x0 - x1 separates them exactly, but only
    with large weights that cancel the noise; a heavy penalty keeps the weights small and falls back on x0,
    which the noise makes close to a coin flip."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    noise = 10.0 * torch.randn(n, generator=generator)
    features = torch.stack([(2.0 * labels - 1.0) + noise, noise], dim=1)
    if shuffle_labels:
        labels = labels[torch.randperm(n, generator=generator)]
    return FeatureSet(features, labels)


def test_separable_features_reach_100_percent() -> None:
    train, test = clusters(40, 4, 8, 0.3, seed=0), clusters(10, 4, 8, 0.3, seed=1)
    result = lbfgs_probe(train, test, 4, LbfgsConfig())
    assert result["top1"] == 100.0 and result["top5"] == 100.0 and result["val_top1"] == 100.0
    assert result["l2"] in LbfgsConfig().l2_grid and result["val_images"] == 32.0


def test_fit_minimises_the_penalised_objective() -> None:
    """At the returned weights the gradient of mean CE + l2/2 ||W||^2 vanishes (autograd checks the closure)."""
    data = clusters(30, 3, 5, 2.0, seed=2)
    cfg = LbfgsConfig(max_iter=500, tolerance_grad=1e-7, standardize=False)
    fit = fit_logreg(data.features, data.labels, 3, 1e-2, cfg)
    weight, bias = fit.weight.clone().requires_grad_(), fit.bias.clone().requires_grad_()
    logits = data.features @ weight.T + bias
    loss = torch.nn.functional.cross_entropy(logits, data.labels) + 0.5e-2 * weight.pow(2).sum()
    loss.backward()  # type: ignore[no-untyped-call]
    assert weight.grad is not None and bias.grad is not None
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4


def test_standardisation_is_folded_into_the_classifier() -> None:
    """The standardised fit, mapped back, scores raw features exactly like the fit on standardised inputs."""
    data = clusters(30, 3, 5, 2.0, seed=3)
    scaled = FeatureSet(data.features * torch.tensor([1e3, 1.0, 1e-3, 5.0, 1.0]) + 7.0, data.labels)
    cfg = LbfgsConfig(max_iter=300, tolerance_grad=1e-7)
    raw = fit_logreg(data.features, data.labels, 3, 1e-3, cfg)
    rescaled = fit_logreg(scaled.features, scaled.labels, 3, 1e-3, cfg)
    assert torch.equal(raw.module()(data.features).argmax(1), rescaled.module()(scaled.features).argmax(1))


def test_strength_is_chosen_on_the_held_out_split_and_heavy_l2_loses() -> None:
    train, test = _nuisance(2000, seed=0), _nuisance(1000, seed=1)
    weak, heavy = 1e-5, 10.0
    only_heavy = lbfgs_probe(train, test, 2, LbfgsConfig(l2_grid=(heavy,)))
    only_weak = lbfgs_probe(train, test, 2, LbfgsConfig(l2_grid=(weak,)))
    assert only_weak["top1"] > 99.0 and only_heavy["top1"] < 70.0  # the constructed case: heavy must lose
    chosen = lbfgs_probe(train, test, 2, LbfgsConfig(l2_grid=(heavy, 1.0, weak)))
    assert chosen["l2"] == weak and chosen["val_top1"] > 99.0 and chosen["top1"] == only_weak["top1"]
    # the test labels play no part in the choice: with shuffled test labels the same strength wins
    shuffled = lbfgs_probe(train, _nuisance(1000, seed=1, shuffle_labels=True), 2, LbfgsConfig(l2_grid=(heavy, weak)))
    assert shuffled["l2"] == weak and shuffled["val_top1"] == chosen["val_top1"] and shuffled["top1"] < 70.0


def test_same_features_give_the_same_numbers() -> None:
    train, test = clusters(50, 5, 16, 6.0, seed=4), clusters(20, 5, 16, 6.0, seed=5)
    first = lbfgs_probe(train, test, 5, LbfgsConfig(), seed=3)
    second = lbfgs_probe(train, test, 5, LbfgsConfig(), seed=3)
    assert first == second
    assert 0.0 < first["top1"] < 100.0  # not a trivial case


def test_protocol_option_config_and_benchmark() -> None:
    spec = BENCHMARKS["linear"]
    assert spec.version == "2"
    assert spec.config("full").protocol == "sgd" and spec.config("tiny").protocol == "sgd"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="train_augment=false"):
        spec.config("full", ["protocol=lbfgs"])
    cfg = spec.config("full", ["protocol=lbfgs", "train_augment=false", "lbfgs.l2_grid=[0.001,0.1]"])
    assert isinstance(cfg, LinearConfig) and cfg.lbfgs.l2_grid == (0.001, 0.1)
    with pytest.raises(ConfigError, match="l2"):
        spec.config("tiny", ["protocol=lbfgs", "lbfgs.l2_grid=[0.0]"])
    small = ["max_train_samples=300", "max_test_samples=100", "protocol=lbfgs", "lbfgs.max_iter=30"]
    metrics = evaluate("linear", None, FASHION_MNIST, "tiny", overrides=small, baseline="pixels")
    assert 50.0 < metrics["linear/top1"] <= 100.0 and metrics["linear/l2"] in LbfgsConfig().l2_grid
    assert metrics["linear/val_images"] == 60.0 and metrics["linear/feature_dim"] == 3 * 32 * 32
    assert "linear/top1_best" not in metrics  # no per-epoch maximum over the test set in this protocol
