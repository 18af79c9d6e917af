"""Shared fixtures: a micro training config that runs in seconds on real Fashion-MNIST."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = REPO / "data" / "fashion-mnist"


def micro_overrides(output_dir: Path, method: str = "selfpatch", *extra: str) -> list[str]:
    """tiny_cpu shrunk to a 2-block, 32-wide ViT on 64 images: 8 steps per epoch."""
    return [
        f"method={method}",
        "model.embed_dim=32",
        "model.num_heads=2",
        "model.depth=2",
        "head.hidden_dim=64",
        "head.bottleneck_dim=32",
        "head.out_dim=128",
        "selfpatch.out_dim=64",
        "crops.local_number=2",
        "optim.batch_size_per_gpu=8",
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        "data.max_samples=64",
        "data.num_workers=0",
        f"data.path={FASHION_MNIST}",
        f"checkpoint.output_dir={output_dir}",
        "checkpoint.saveckp_freq=1",
        "logging.mlflow=false",
        "logging.progress=off",
        "logging.log_every=2",
        *extra,
    ]


@pytest.fixture(scope="session", autouse=True)
def _data_present() -> None:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        raise RuntimeError("Fashion-MNIST is missing: run `make setup` (scripts/fetch_data.sh) first")


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their tracking store explicitly."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.environ.setdefault("PYTHONHASHSEED", "0")
