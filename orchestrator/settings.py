"""Service settings from the environment (prefix ORCH_), with embedded defaults that need no setup."""

from __future__ import annotations

import os
import re
import secrets
import sys
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, computed_field, field_validator
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
    job_api_url: str | None = Field(
        None,
        description="URL jobs on other machines (SLURM nodes, Ray workers) reach the API at, when api_url is a "
        "name only the service's network resolves (compose's http://api:8000); default api_url.",
    )
    job_mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow server URL those jobs log to, when the service's own is network-internal "
        "(http://mlflow:5000); default the service's tracking URI.",
    )
    slurm_python: str | None = Field(
        None,
        description="Interpreter on the SLURM nodes with this project installed, when it is not at `python`'s "
        "path there (the service runs in a container); SLURM jobs only.",
    )
    secret_key: str | None = Field(
        None, description="Key that derives each run's report token; default <home>/secret.key."
    )
    admin_tokens: str = Field("", description="name:token pairs (comma-separated) with read-write access.")
    read_tokens: str = Field("", description="name:token pairs with read-only access.")
    python: str = Field(sys.executable, description="Python interpreter that runs jobs (this venv by default).")
    default_launcher: str = Field("local", description="Launcher for runs that name none.")
    eval_launcher: str | None = Field(
        None,
        description="Launcher for evaluations whose policy names none (e.g. 'local' on a GPU worker beside a "
        "SLURM-trained fleet); None: the default launcher.",
    )
    local_max_concurrent: int = Field(1, ge=1, description="Local launcher: jobs running at once.")
    local_eval_max_concurrent: int = Field(1, ge=1, description="Local launcher: evaluations running at once.")
    slurm_partition: str | None = Field(None, description="Default SLURM partition.")
    slurm_export_env: str = Field(
        "",
        description="Environment variables SLURM jobs inherit from the service beyond PATH, HOME, USER, LANG, "
        "TZ, TMPDIR, LD_LIBRARY_PATH and CUDA_HOME (comma-separated names, e.g. NCCL_SOCKET_IFNAME); the "
        "service's own ORCH_* settings never go to jobs.",
    )
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

    @field_validator("job_api_url", "job_mlflow_tracking_uri")
    @classmethod
    def _reachable_url(cls, value: str | None) -> str | None:
        """Written into every job file and used from other machines: refuse what could not work there."""
        if value is None or value == "":
            return None
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("must not contain whitespace or control characters")
        parts = urlsplit(value)
        _ = parts.port  # ValueError for a port that is not a number in 0-65535
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL with a host")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"{value!r}: no credentials, query or fragment (jobs append paths to it)")
        return value.rstrip("/")

    @field_validator("default_launcher", "eval_launcher")
    @classmethod
    def _known_launcher(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A typo here would only surface when the first job fails to launch: refuse it at start-up."""
        from orchestrator.launchers import LAUNCHERS  # the launcher table imports these settings

        if value == "" and info.field_name == "eval_launcher":
            return None  # compose passes an unset variable as empty
        if value is not None and value not in LAUNCHERS:
            raise ValueError(f"unknown launcher {value!r}; choose from {', '.join(LAUNCHERS)}")
        return value

    @field_validator("slurm_export_env")
    @classmethod
    def _variable_names(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        for name in names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name.upper().startswith("ORCH_"):
                raise ValueError(f"{name}: the service's settings (and secrets) are not passed to jobs")
        return ",".join(names)

    @property
    def slurm_export_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.slurm_export_env.split(",") if n)

    @field_validator("slurm_python")
    @classmethod
    def _absolute_python(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith("/") or any(ch.isspace() or ord(ch) < 32 for ch in value):
            raise ValueError(f"{value!r} is not an absolute path without spaces")
        return value

    @property
    def jobs_api_url(self) -> str:
        """The API URL written into job files."""
        return self.job_api_url or self.api_url

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
