"""Shared, cached inputs of the evaluator tests: real micro trainer checkpoints and small composites sets.

Built once per pytest process (in a temporary folder removed at exit), so every test module reuses them.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from evaluator.features import FeatureSet
from tests.conftest import REPO, micro_overrides

COMPOSITE_SOURCES = REPO / "data" / "composite-sources"
_ROOT = Path(tempfile.mkdtemp(prefix="eval-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


@lru_cache(maxsize=4)
def micro_checkpoint(method: str = "selfpatch") -> Path:
    """A real trainer checkpoint: one epoch of the micro config (2 blocks, 32 wide) on Fashion-MNIST."""
    from trainer.presets import load_config
    from trainer.train import train

    out = _ROOT / f"ckpt-{method}"
    cfg = load_config("tiny_cpu", [*micro_overrides(out, method, "optim.epochs=1"), "optim.warmup_epochs=0"])
    with torch.enable_grad():  # the first caller may be a no_grad test
        result = train(cfg)
    assert result.status == "completed", result
    return out / "checkpoint.pth"


@lru_cache(maxsize=4)
def composites(train: int = 6, val: int = 3, size: int = 96, seed: int = 0) -> Path:
    """A small synthetic-composites set from the real Debian sources."""
    from evaluator.composites import generate

    if not (COMPOSITE_SOURCES / "SOURCES.txt").is_file():
        raise RuntimeError("composite sources missing: run `make setup` (scripts/fetch_data.sh) first")
    out = _ROOT / f"composites-{train}-{val}-{size}-{seed}"
    generate(COMPOSITE_SOURCES, out, {"train": train, "val": val}, size=size, seed=seed)
    return out


def clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int) -> FeatureSet:
    """Features in well-separated Gaussian clusters, one per class (a probe's known answer)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(classes, dim) * 10
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return FeatureSet(features, labels)
