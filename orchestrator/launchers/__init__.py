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

    def get(self, name: str) -> Launcher:
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def _make(self, name: str) -> Launcher:
        settings = self.settings
        if name == "local":
            from orchestrator.launchers.local import LocalLauncher

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
