"""Benchmarks for DINO / SelfPatch checkpoints: k-NN, linear probe, detection, semantic segmentation.

    from evaluator import evaluate
    metrics = evaluate("knn", "outputs/tiny_cpu/checkpoint.pth", "data/fashion-mnist", "tiny")
    metrics["knn/top1_k20"]

`python -m evaluator --help` for the command line; `evaluator.composites` generates the synthetic
composites used for detection and segmentation when no real COCO / ADE20K copy is at hand.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """Import lazily: the runnable registry pulls in torch, timm and torchvision; `describe` needs none of them."""
    if name == "describe":
        from evaluator.config import describe

        return describe
    if name in {"BENCHMARKS", "Benchmark", "EvalResult", "evaluate", "get_benchmark"}:
        from evaluator import benchmarks

        return getattr(benchmarks, name)
    raise AttributeError(f"module 'evaluator' has no attribute {name!r}")


__all__ = ["BENCHMARKS", "Benchmark", "EvalResult", "describe", "evaluate", "get_benchmark"]
