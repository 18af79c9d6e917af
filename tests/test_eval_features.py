"""The feature cache (a second probe computes nothing), the probe benchmarks end to end, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evaluator.features as features_module
from evaluator.backbones import FeatureSpec, PixelFeatures, load_backbone
from evaluator.benchmarks import BENCHMARKS, apply_overrides, evaluate
from evaluator.datasets import classification_split
from evaluator.features import Extractor, FeatureCache, ImageTransform, make_extractor
from tests.conftest import FASHION_MNIST
from tests.eval_support import micro_checkpoint
from trainer.presets import ConfigError

SMALL = ["max_train_samples=120", "max_test_samples=40", "batch_size=64"]


class CountingExtractor(Extractor):
    """An extractor that counts the images it is asked to process (the spy)."""

    def __init__(self, inner: Extractor) -> None:
        super().__init__(inner.identity, self._count, inner.device)
        self.inner, self.images = inner, 0

    def _count(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return self.inner.fn(images)


def test_second_request_computes_nothing(tmp_path: Path) -> None:
    backbone = load_backbone(micro_checkpoint("selfpatch"))
    spy = CountingExtractor(make_extractor(backbone, FeatureSpec(pool="avg"), torch.device("cpu")))
    split = classification_split(FASHION_MNIST, "test").subset(50, seed=0)
    transform = ImageTransform(resize=32, crop=32)
    cache = FeatureCache(tmp_path / "cache")
    first = cache.get(spy, split, transform, batch_size=16)
    assert spy.images == 50 and cache.stats.misses == 1
    second = FeatureCache(tmp_path / "cache").get(spy, split, transform, batch_size=16)  # a new process, same disk
    assert spy.images == 50  # nothing computed
    torch.testing.assert_close(second.features, first.features)
    assert torch.equal(second.labels, first.labels)
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave no temporaries

    cache.get(spy, split, ImageTransform(resize=36, crop=32), batch_size=16)  # another transform: another key
    assert spy.images == 100
    other_split = classification_split(FASHION_MNIST, "test").subset(50, seed=1)
    cache.get(spy, other_split, transform, batch_size=16)  # another dataset subset: another key
    assert spy.images == 150


def test_damaged_cache_entry_is_recomputed_not_trusted(tmp_path: Path) -> None:
    spy = CountingExtractor(make_extractor(PixelFeatures(), FeatureSpec(), torch.device("cpu")))
    split = classification_split(FASHION_MNIST, "test").subset(20, seed=0)
    transform = ImageTransform(resize=8, crop=8)
    cache = FeatureCache(tmp_path)
    reference = cache.get(spy, split, transform)
    (entry,) = list(tmp_path.rglob("*.pt"))
    entry.write_bytes(b"damaged")
    again = cache.get(spy, split, transform)
    assert spy.images == 40
    torch.testing.assert_close(again.features, reference.features)
    assert reference.features.shape == (20, 3 * 8 * 8)


def test_knn_and_linear_reuse_cached_features_across_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_extract = features_module.extract

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs.get("desc", ""))
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(features_module, "extract", spy)
    checkpoint = micro_checkpoint("selfpatch")
    knn = evaluate("knn", checkpoint, FASHION_MNIST, "tiny", overrides=SMALL, cache_dir=tmp_path)
    assert calls == ["train features", "test features"]
    assert set(knn) >= {"knn/top1_k10", "knn/top1_k20", "knn/top1_k100", "knn/top1_k200", "knn/top5_k20"}
    assert all(0.0 <= v <= 100.0 for k, v in knn.items() if "top" in k)
    assert knn["knn/train_images"] == 120 and knn["knn/test_images"] == 40

    again = evaluate("knn", checkpoint, FASHION_MNIST, "tiny", overrides=SMALL, cache_dir=tmp_path)
    assert len(calls) == 2 and again == knn  # second run: no features computed, same numbers
    linear = evaluate("linear", checkpoint, FASHION_MNIST, "tiny", overrides=[*SMALL, "epochs=5"], cache_dir=tmp_path)
    assert len(calls) == 2  # the probe reads the k-NN run's features (same checkpoint, data, transform, feature)
    assert 0.0 <= linear["linear/top1"] <= linear["linear/top1_best"] <= 100.0
    assert linear["linear/feature_dim"] == 32


def test_run_record_identifies_checkpoint_benchmark_and_config(tmp_path: Path) -> None:
    checkpoint = micro_checkpoint("selfpatch")
    bench = BENCHMARKS["knn"]
    result = bench.run(checkpoint, FASHION_MNIST, "tiny", overrides=[*SMALL, "feature.pool=avg"], cache_dir=tmp_path)
    assert result.benchmark == "knn" and result.version == bench.version
    assert result.checkpoint_sha256 == load_backbone(checkpoint).identity
    assert result.config["feature"]["pool"] == "avg"
    assert (
        result.config_hash
        != bench.run(checkpoint, FASHION_MNIST, "tiny", overrides=SMALL, cache_dir=tmp_path).config_hash
    )
    pixels = bench.run(None, FASHION_MNIST, "tiny", overrides=SMALL, baseline="pixels", cache_dir=tmp_path)
    assert pixels.checkpoint_sha256 == "raw-pixels:v1" and pixels.baseline == "pixels"


def test_config_overrides_are_validated() -> None:
    tiny = BENCHMARKS["linear"].config("tiny")
    changed = apply_overrides(tiny, ["epochs=7", "feature.pool=avg", "transform.crop=28"])
    assert (changed.epochs, changed.feature.pool, changed.transform.crop) == (7, "avg", 28)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        apply_overrides(tiny, ["epoch=7"])
    with pytest.raises(ConfigError, match=r"feature\.pool"):
        apply_overrides(tiny, ["feature.pool=mean"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(tiny, ["epochs"])
    with pytest.raises(ConfigError, match="no config named 'huge'"):
        BENCHMARKS["det"].config("huge")
    full = BENCHMARKS["linear"].config("full")
    assert (full.epochs, full.base_lr, full.train_augment, full.transform.crop) == (100, 1e-3, True, 224)  # type: ignore[attr-defined]
    det = BENCHMARKS["det"].config("full")
    assert det.lr == 5e-5 and det.weight_decay == 0.05 and det.test_min_size == 800  # type: ignore[attr-defined]
    seg = BENCHMARKS["seg"].config("full")
    assert seg.iterations == 40000 and seg.lr == 6e-5 and seg.crop_size == 512  # type: ignore[attr-defined]


def test_linear_with_dino_augmentation_runs_the_backbone_on_every_batch(tmp_path: Path) -> None:
    checkpoint = micro_checkpoint("dino")
    backbone = load_backbone(checkpoint)
    calls = {"images": 0}
    real = backbone.image_features

    def counting(images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
        calls["images"] += len(images)
        return real(images, spec)

    backbone.image_features = counting  # type: ignore[method-assign]
    bench = BENCHMARKS["linear"]
    overrides = [*SMALL, "epochs=2", "train_augment=true", "train_batch_size=64"]
    result = bench.run(checkpoint, FASHION_MNIST, "tiny", overrides=overrides, cache_dir=tmp_path, subject=backbone)
    assert calls["images"] == 120 + 40 + 2 * 120  # cached centre crops once, then 2 epochs of augmented crops
    assert result.metrics["linear/feature_dim"] == 2 * 32  # DINO's last-4 [CLS], capped at the 2 blocks there are
