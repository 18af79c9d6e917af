"""A search's report: every trial with its sampled values, how far it got, its objective, and why it ended.

Trials ASHA stopped early are ranked by their value at the epoch they stopped, which is not comparable
with a finished trial's final value: the report says so, and the curves plot shows every trial epoch by
epoch. The best trial is chosen among those that finished all epochs (if any did).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.lifecycle import TERMINAL, Status

_TERMINAL = frozenset(str(s) for s in TERMINAL)


@dataclass(frozen=True)
class SearchRow:
    trial: str  # Ray Tune's trial id
    run_id: str
    status: str
    reason: str | None
    params: dict[str, Any]
    history: list[tuple[int, float]]  # (epoch, objective)
    accelerator_seconds: float = 0.0

    @property
    def epochs(self) -> int:
        return self.history[-1][0] if self.history else 0

    @property
    def value(self) -> float | None:
        return self.history[-1][1] if self.history else None


@dataclass(frozen=True)
class SearchReport:
    sweep: str
    sweep_id: str
    metric: str
    direction: Literal["max", "min"]
    epochs: int  # what a finished trial trains
    search_status: str
    rows: list[SearchRow]
    budget_hours: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return self.search_status not in _TERMINAL or any(r.status not in _TERMINAL for r in self.rows)

    def ranked(self) -> list[SearchRow]:
        """Best first by the latest objective (trials without one last)."""
        sign = -1.0 if self.direction == "max" else 1.0
        return sorted(self.rows, key=lambda r: (r.value is None, sign * (r.value if r.value is not None else 0.0)))

    @property
    def best(self) -> SearchRow | None:
        finished = [r for r in self.ranked() if r.status == Status.SUCCEEDED.value and r.value is not None]
        return finished[0] if finished else None

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def accelerator_hours(self) -> float:
        return sum(r.accelerator_seconds for r in self.rows) / 3600

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "kind": "search",
            "sweep": self.sweep,
            "sweep_id": self.sweep_id,
            "metric": self.metric,
            "direction": self.direction,
            "epochs": self.epochs,
            "search_status": self.search_status,
            "partial": self.partial,
            "status_counts": self.status_counts(),
            "best": _row_json(best) if best else None,
            "trials": [_row_json(r) for r in self.ranked()],
            "accelerator_hours": self.accelerator_hours,
            "budget_hours": self.budget_hours,
            "warnings": self.warnings,
        }

    def to_markdown(self) -> str:
        keys = sorted({k for r in self.rows for k in r.params})
        lines = [f"# Search report: {self.sweep}", ""]
        if self.partial:
            lines += [f"> **Partial**: the search is {self.search_status}; numbers will change.", ""]
        counts = ", ".join(f"{n} {s}" for s, n in self.status_counts().items()) or "no trials yet"
        lines += [
            f"Objective: `{self.metric}` ({self.direction}imise), reported every epoch; {self.epochs} epochs per "
            f"trial. Trials: {counts}. Accelerator-hours: {self.accelerator_hours:.3f}"
            + (f" of a {self.budget_hours:g} h budget." if self.budget_hours else "."),
            "",
        ]
        best = self.best
        if best is not None:
            values = ", ".join(f"`{k}={best.params[k]}`" for k in keys if k in best.params)
            lines += [f"**Best finished trial**: {best.trial} with {self.metric} = {_num(best.value)} ({values}).", ""]
        lines += [
            "| rank | trial | status | epochs | "
            + " | ".join(f"`{k}`" for k in keys)
            + f" | {self.metric} | why it ended |",
            "|---:|---|---|---:|" + "---:|" * len(keys) + "---:|---|",
        ]
        for rank, row in enumerate(self.ranked(), 1):
            params = " | ".join(_num(row.params.get(k)) for k in keys)
            lines.append(
                f"| {rank} | {row.trial} | {row.status} | {row.epochs} | {params} | {_num(row.value)} | "
                f"{_md(row.reason or '')} |"
            )
        lines += [
            "",
            "Trials stopped early are ranked by their value at the epoch they stopped; it is not comparable with a "
            "finished trial's final value. The curves plot shows every trial epoch by epoch.",
        ]
        for warning in self.warnings:
            lines.append(f"\n> Warning: {warning}")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        keys = sorted({k for r in self.rows for k in r.params})
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["rank", "trial", "run_id", "status", "epochs", *keys, self.metric, "reason", "partial"])
        for rank, row in enumerate(self.ranked(), 1):
            values = [row.params.get(k, "") for k in keys]
            head = [rank, row.trial, row.run_id, row.status, row.epochs]
            writer.writerow([*head, *values, _csv_number(row.value), row.reason or "", self.partial])
        return out.getvalue()

    def curves(self) -> dict[str, dict[int, list[tuple[int, float]]]]:
        """For the curves plot: every trial's objective by epoch (one "seed" per trial)."""
        return {row.trial: {0: row.history} for row in self.rows if row.history}


def _row_json(row: SearchRow) -> dict[str, Any]:
    return {
        "trial": row.trial,
        "run_id": row.run_id,
        "status": row.status,
        "reason": row.reason,
        "params": row.params,
        "epochs": row.epochs,
        "value": row.value,
        "history": [[epoch, value] for epoch, value in row.history],
        "accelerator_hours": row.accelerator_seconds / 3600,
    }


def dumps(report: SearchReport) -> str:
    return json.dumps(report.to_json(), indent=2, allow_nan=False)


def _num(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return "—" if not math.isfinite(x) else f"{x:.4g}"
    return str(x)


def _csv_number(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else repr(x)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]
