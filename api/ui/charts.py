"""Curves for the pages: MLflow metric histories, downsampled so a run with 100k points stays responsive.

Downsampling keeps, per bucket of consecutive steps, the minimum and the maximum (in step order): spikes
and divergences survive, which a plain stride or a mean would hide. Histories of finished runs never
change, so they are read once; a running run's grow by what MLflow logged since the last request (read by
step range on MLflow's side), so a page refreshing a long run's curves costs only the new points.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass
class Series:
    """One metric's raw points, extended in place while its run is alive."""

    steps: array[int] = field(default_factory=lambda: array("q"))
    values: array[float] = field(default_factory=lambda: array("d"))
    finished: bool = False
    shown: dict[int, list[Point]] = field(default_factory=dict)  # downsampled, by max_points, once finished

    def extend(self, points: Sequence[Point]) -> None:
        for step, value in points:
            self.steps.append(int(step))
            self.values.append(float(value))
        self.shown.clear()

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else -1

    def __len__(self) -> int:
        return len(self.steps)


class CurveCache:
    """Raw histories by (MLflow run, metric), least recently used out past `capacity_points` points in all:
    a finished run's is read once, a running run's grows by what was logged since the last request."""

    def __init__(self, capacity_points: int = 2_000_000) -> None:
        self.capacity_points = capacity_points
        self._items: OrderedDict[tuple[str, str], Series] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Series | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, str], series: Series) -> None:
        with self._lock:
            self._items[key] = series
            self._items.move_to_end(key)
            total = sum(len(s) for s in self._items.values())
            while total > self.capacity_points and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                total -= len(dropped)


def series(mlflow: MlflowBridge, cache: CurveCache, run_id: str, key: str, *, finished: bool) -> Series:
    found = cache.get((run_id, key))
    if found is not None and not found.finished:
        since = mlflow.metric_after(run_id, key, found.last_step)
        if since is None:  # the store cannot read by range, or too much arrived: read it all again
            found = None
        else:
            found.extend(since)
    if found is None:
        found = Series()
        found.extend(sorted(mlflow.metric_history(run_id, key)))
        cache.put((run_id, key), found)
    found.finished = finished
    return found


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
        try:
            found = series(mlflow, cache, run_id, key, finished=finished)
        except Exception:  # an unreachable or pruned MLflow run shows no curve, not an error page
            continue
        shown = found.shown.get(max_points)
        if shown is None:
            shown = downsample(list(zip(found.steps, found.values, strict=True)), max_points)
            if found.finished:
                found.shown[max_points] = shown
        if shown:
            out[key] = {"steps": [s for s, _ in shown], "values": [v for _, v in shown]}
    return out
