"""The production stack, validated offline (no Docker engine here): compose schema, references, secrets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

COMPOSE = str(Path(sys.executable).parent / "docker-compose")
SECRETS = {"POSTGRES_PASSWORD": "pw", "ORCH_ADMIN_TOKENS": "admin:tok", "ORCH_SECRET_KEY": "k"}


def compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [COMPOSE, "-f", str(REPO / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=REPO,
        timeout=60,
    )


def test_compose_file_is_valid_and_wires_the_services() -> None:
    result = compose("config", "--format", "json", env=SECRETS)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert set(config["services"]) == {"postgres", "mlflow", "api", "scheduler"}
    api = config["services"]["api"]
    assert api["environment"]["ORCH_DATABASE_URL"].startswith("postgresql+psycopg://orch:pw@postgres:5432/")
    assert api["environment"]["ORCH_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--no-reconciler" in api["command"] and config["services"]["scheduler"]["command"] == ["scheduler"]
    assert {"postgres", "mlflow"} <= set(api["depends_on"])


def test_two_api_replicas_and_two_schedulers_share_postgresql() -> None:
    """Scale-out: the API replicas each get a host port, the schedulers elect one reconciler on PostgreSQL
    (orchestrator/leader.py), so both may run; on SQLite a second one would be refused."""
    result = compose("config", "--format", "json", env=SECRETS)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    api, scheduler = services["api"], services["scheduler"]
    assert api["deploy"]["replicas"] == 2 and scheduler["deploy"]["replicas"] == 2
    [port] = api["ports"]
    assert port["target"] == 8000 and port["published"] == "8000-8001"  # one host port per replica
    assert "container_name" not in api and "container_name" not in scheduler  # names would clash
    for service in (api, scheduler):
        assert service["environment"]["ORCH_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert service["restart"] == "unless-stopped"  # a killed leader comes back as a standby
    assert api["environment"]["ORCH_API_URL"] == "http://api:8000"  # jobs report to any replica


def test_missing_secrets_are_refused_by_name() -> None:
    result = compose("config", env={k: v for k, v in SECRETS.items() if k != "ORCH_SECRET_KEY"})
    # this compose build prints the interpolation error and renders nothing (its exit code stays 0)
    assert "required variable ORCH_SECRET_KEY is missing" in result.stderr and not result.stdout.strip()


def test_dockerfile_copies_only_what_exists() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    sources = re.findall(r"^COPY (?!--from=)(\S+)", dockerfile, flags=re.MULTILINE)  # build context only
    assert sources and all((REPO / s).exists() for s in sources), sources
    assert 'ENTRYPOINT ["orchestrator"]' in dockerfile


def test_mlflow_serves_artifacts_from_a_volume_the_image_user_owns() -> None:
    """Runs upload their exports through the server (proxied artifacts) into the mounted volume; a fresh named
    volume takes the ownership of the image's folder, so the folder must exist there, owned by `orch`."""
    result = compose("config", "--format", "json", env=SECRETS)
    assert result.returncode == 0, result.stderr
    mlflow = json.loads(result.stdout)["services"]["mlflow"]
    assert "--serve-artifacts" in mlflow["command"]
    assert "--artifacts-destination=/var/lib/mlflow/artifacts" in mlflow["command"]
    assert [v["target"] for v in mlflow["volumes"] if v["type"] == "volume"] == ["/var/lib/mlflow"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"mkdir -p [^\n]*/var/lib/mlflow/artifacts", dockerfile)
    assert re.search(r"chown orch [^\n]*/var/lib/mlflow /var/lib/mlflow/artifacts", dockerfile)
    assert dockerfile.index("chown orch") < dockerfile.index("USER orch")
