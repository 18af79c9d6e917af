"""Launchers: one module per backend behind the interface in `base.py`, named in one table."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from orchestrator.launchers.base import JobSpec, JobState, JobStatus, Launcher, LauncherError, Resources
from orchestrator.settings import Settings

__all__ = [
    "INTERNAL_LAUNCHERS",
    "LAUNCHERS",
    "JobSpec",
    "JobState",
    "JobStatus",
    "Launcher",
    "LauncherError",
    "LauncherName",
    "Launchers",
    "Resources",
]

#: name -> "module:factory" of a function (settings, queue) -> Launcher; imported on first use (SLURM and Ray
#: import heavy clients).
LAUNCHERS: dict[str, str] = {
    "local": "orchestrator.launchers.local:from_settings",
    "slurm": "orchestrator.launchers.slurm:from_settings",
    "ray": "orchestrator.launchers.ray:from_settings",
    "dryrun": "orchestrator.launchers.dryrun:from_settings",
}
#: Backends users never name: the trials of a Ray Tune search are started by their search job.
INTERNAL_LAUNCHERS: dict[str, str] = {"tune": "orchestrator.launchers.tune:from_settings"}
if TYPE_CHECKING:
    LauncherName = str
else:
    LauncherName = Literal[tuple(LAUNCHERS)]


class Launchers:
    """The launchers a service uses, made on first use; `fixed` replaces some (tests, benchmarks)."""

    def __init__(self, settings: Settings, fixed: dict[str, Launcher] | None = None) -> None:
        self.settings = settings
        self._made: dict[str, Launcher] = {}
        self._fixed = dict(fixed or {})

    def close(self) -> None:
        """Release what launchers started for this service (the local Ray cluster)."""
        for launcher in self._made.values():
            close = getattr(launcher, "close", None)
            if callable(close):
                close()
        self._made.clear()

    def get(self, name: str, queue: str = "train") -> Launcher:
        """The launcher `name` for a queue: evaluations (queue 'eval') have their own local job slots."""
        if name in self._fixed:
            return self._fixed[name]
        known = {**LAUNCHERS, **INTERNAL_LAUNCHERS}
        if name not in known:
            raise LauncherError(f"unknown launcher {name!r}; choose from {', '.join(LAUNCHERS)}")
        key = f"{name}:{queue}" if name == "local" else name
        if key not in self._made:
            module_name, _, factory_name = known[name].partition(":")
            factory: Callable[[Settings, str], Launcher] = getattr(importlib.import_module(module_name), factory_name)
            self._made[key] = factory(self.settings, queue)
        return self._made[key]
