"""Curves for the pages: MLflow metric histories, downsampled so a run with 100k points stays responsive.

Downsampling keeps, per bucket of consecutive steps, the minimum and the maximum (in step order): spikes
and divergences survive, which a plain stride or a mean would hide. Histories of finished runs never
change, so they are cached; a running run's are read again on every request.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from orchestrator.mlflow_bridge import MlflowBridge

Point = tuple[int, float]

TRAIN_CURVES = ("train/loss", "train/cls_loss", "train/patch_loss", "train/lr", "train/img_per_s")
MAX_POINTS = 1000


def downsample(points: Sequence[Point], max_points: int = MAX_POINTS) -> list[Point]:
    """At most `max_points` points, sorted by step, keeping each bucket's extremes and the endpoints."""
    ordered = sorted((int(s), float(v)) for s, v in points if math.isfinite(v))
    if len(ordered) <= max_points:
        return ordered
    buckets = max(1, max_points // 2)
    size = len(ordered) / buckets
    out: list[Point] = []
    for b in range(buckets):
        chunk = ordered[int(b * size) : int((b + 1) * size)]
        if not chunk:
            continue
        low = min(chunk, key=lambda p: p[1])
        high = max(chunk, key=lambda p: p[1])
        out.extend(sorted({low, high}))
    if out[0] != ordered[0]:
        out[0] = ordered[0]
    if out[-1] != ordered[-1]:
        out[-1] = ordered[-1]
    return out


class CurveCache:
    """Downsampled histories of finished runs, least recently used first out."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str, int], list[Point]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int]) -> list[Point] | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, str, int], value: list[Point]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def curves(
    mlflow: MlflowBridge,
    cache: CurveCache,
    run_id: str,
    keys: Sequence[str],
    *,
    finished: bool,
    max_points: int = MAX_POINTS,
) -> dict[str, dict[str, list[Any]]]:
    """{key: {"steps": [...], "values": [...]}} for every key with at least one point."""
    out: dict[str, dict[str, list[Any]]] = {}
    for key in keys:
        cached = cache.get((run_id, key, max_points)) if finished else None
        if cached is None:
            try:
                cached = downsample(mlflow.metric_history(run_id, key), max_points)
            except Exception:  # an unreachable or pruned MLflow run shows no curve, not an error page
                cached = []
            if finished:
                cache.put((run_id, key, max_points), cached)
        if cached:
            out[key] = {"steps": [s for s, _ in cached], "values": [v for _, v in cached]}
    return out
