"""Launchers: one module per backend behind the interface in `base.py`."""

from __future__ import annotations

from orchestrator.launchers.base import JobSpec, JobState, JobStatus, Launcher, LauncherError, Resources
from orchestrator.settings import Settings

__all__ = ["JobSpec", "JobState", "JobStatus", "Launcher", "LauncherError", "Launchers", "Resources"]


class Launchers:
    """The launchers a service uses, created on first use (SLURM and Ray import heavy clients)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._made: dict[str, Launcher] = {}

    def close(self) -> None:
        """Release what launchers started for this service (the local Ray cluster)."""
        for launcher in self._made.values():
            close = getattr(launcher, "close", None)
            if callable(close):
                close()
        self._made.clear()

    def get(self, name: str, queue: str = "train") -> Launcher:
        """The launcher `name` for a queue: evaluations (queue 'eval') have their own local job slots."""
        key = f"{name}:{queue}" if name == "local" else name
        if key not in self._made:
            self._made[key] = self._make(name, queue)
        return self._made[key]

    def _make(self, name: str, queue: str = "train") -> Launcher:
        settings = self.settings
        if name == "local":
            from orchestrator.launchers.local import LocalLauncher

            if queue == "eval":
                return LocalLauncher(settings.home.resolve() / "local-eval-jobs", settings.local_eval_max_concurrent)
            return LocalLauncher(settings.home.resolve() / "local-jobs", settings.local_max_concurrent)
        if name == "dryrun":
            from orchestrator.launchers.dryrun import DryRunLauncher

            return DryRunLauncher()
        if name == "slurm":
            from orchestrator.launchers.slurm import SlurmLauncher

            return SlurmLauncher(settings.home.resolve() / "slurm", default_partition=settings.slurm_partition)
        if name == "ray":
            from orchestrator.launchers.ray import RayLauncher

            return RayLauncher(settings.ray_address, settings.home.resolve() / "ray")
        raise LauncherError(f"unknown launcher {name!r}; choose local, slurm, ray or dryrun")
