"""Service settings from the environment (prefix ORCH_), with embedded defaults that need no setup."""

from __future__ import annotations

import os
import secrets
import sys
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    """The state folder when ORCH_HOME is not set: one per user, so the CLI finds it from any directory."""
    return Path.home() / ".orchestrator"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_", env_file=None, extra="ignore")

    home: Path = Field(
        default_factory=default_home, description="State folder: database, run folders, tokens (~/.orchestrator)."
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in <home>/orchestrator.db.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow store for runs; default $MLFLOW_TRACKING_URI, else SQLite in ./mlruns."
    )
    mlflow_ui_url: str | None = Field(None, description="Base URL of the MLflow UI, for links in responses.")
    api_url: str = Field("http://127.0.0.1:8000", description="URL jobs report progress to.")
    secret_key: str | None = Field(
        None, description="Key that derives each run's report token; default <home>/secret.key."
    )
    admin_tokens: str = Field("", description="name:token pairs (comma-separated) with read-write access.")
    read_tokens: str = Field("", description="name:token pairs with read-only access.")
    python: str = Field(sys.executable, description="Python interpreter that runs jobs (this venv by default).")
    default_launcher: str = Field("local", description="Launcher for runs that name none.")
    local_max_concurrent: int = Field(1, ge=1, description="Local launcher: jobs running at once.")
    local_eval_max_concurrent: int = Field(1, ge=1, description="Local launcher: evaluations running at once.")
    slurm_partition: str | None = Field(None, description="Default SLURM partition.")
    ray_address: str | None = Field(None, description="Ray cluster address (http://host:8265); None = start one.")
    reconcile_interval_s: float = Field(2.0, gt=0, description="Reconciler poll period.")
    heartbeat_timeout_s: float = Field(600.0, gt=0, description="A running job silent this long is lost.")
    max_requeues: int = Field(3, ge=0, description="Requeues after preemption or loss before a run fails.")
    idempotency_ttl_s: float = Field(24 * 3600.0, gt=0, description="How long Idempotency-Key replies are kept.")
    metrics_public: bool = Field(
        False, description="Serve /metrics without a token (a scraper on an internal network); else read or admin."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Service logs: text, or JSON lines with the request id and an access line per request."
    )

    @computed_field  # type: ignore[prop-decorator]
    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'orchestrator.db').resolve()}"

    @cached_property
    def secret(self) -> bytes:
        """Server secret for run tokens: configured, or generated once into <home>/secret.key (mode 600)."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.home / "secret.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        return path.read_text().strip().encode()

    @property
    def runs_root(self) -> Path:
        return (self.home / "runs").resolve()

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path('mlruns').resolve()}/mlflow.db"


def parse_tokens(spec: str) -> dict[str, str]:
    """'alice:s3cret,ci:t0ken' -> {token: name}."""
    tokens: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, token = item.partition(":")
        if not sep or not token:
            raise ValueError(f"token entry {item!r} is not name:token")
        tokens[token] = name
    return tokens
