"""The production stack, validated offline (no Docker engine here): compose schema, references, secrets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.settings import Settings
from tests.conftest import REPO

COMPOSE = str(Path(sys.executable).parent / "docker-compose")
SHARED = "/shared/orchestrator"
SECRETS = {
    "POSTGRES_PASSWORD": "pw",
    "ORCH_ADMIN_TOKENS": "admin:tok",
    "ORCH_SECRET_KEY": "k",
    "ORCH_SHARED_DIR": SHARED,
    "ORCH_PUBLIC_HOST": "orch01.cluster.example.org",
}


def compose(
    *args: str, env: dict[str, str], files: tuple[str, ...] = ("compose.yaml",)
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("ORCH_")}
    return subprocess.run(
        [COMPOSE, *(arg for name in files for arg in ("-f", str(REPO / name))), *args],
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
    assert set(config["services"]) == {"postgres", "mlflow-init", "mlflow", "api", "scheduler"}
    api = config["services"]["api"]
    assert api["environment"]["ORCH_DATABASE_URL"].startswith("postgresql+psycopg://orch:pw@postgres:5432/")
    assert api["environment"]["ORCH_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    scheduler = config["services"]["scheduler"]["command"]
    assert "--no-reconciler" in api["command"] and scheduler[0] == "scheduler" and "--metrics-port" in scheduler
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


def rendered(env: dict[str, str] = SECRETS, files: tuple[str, ...] = ("compose.yaml",)) -> dict[str, Any]:
    result = compose("config", "--format", "json", env=env, files=files)
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = json.loads(result.stdout)["services"]
    return services


def test_jobs_on_compute_nodes_get_urls_they_can_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    """`api` and `mlflow` resolve only inside the compose network: job files name this host instead, and the
    settings the containers start with accept those URLs."""
    services = rendered()
    for name in ("api", "scheduler"):
        env = services[name]["environment"]
        assert env["ORCH_API_URL"] == "http://api:8000"  # in-container (local) jobs
        assert env["ORCH_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["ORCH_JOB_API_URL"] == "http://orch01.cluster.example.org:8000"
        assert env["ORCH_JOB_MLFLOW_TRACKING_URI"] == "http://orch01.cluster.example.org:5000"
        for key in [k for k in os.environ if k.startswith("ORCH_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.jobs_api_url == "http://orch01.cluster.example.org:8000"
        assert settings.job_mlflow_tracking_uri == "http://orch01.cluster.example.org:5000"
        assert settings.home == Path(SHARED) and settings.runs_root == Path(SHARED) / "runs"
        assert settings.slurm_python is None and settings.default_launcher == "slurm"
    # MLflow's DNS-rebinding guard must know both names it is called by, or it answers 403
    allowed = next(a for a in services["mlflow"]["command"] if a.startswith("--allowed-hosts="))
    assert {"mlflow:5000", "orch01.cluster.example.org:5000"} <= set(allowed.split("=", 1)[1].split(","))
    # explicit URLs (a load balancer in front of the replicas) win over the derived ones
    custom = rendered(
        {**SECRETS, "ORCH_JOB_API_URL": "https://orch.example.org", "ORCH_SLURM_PYTHON": "/opt/o/bin/python"}
    )
    assert custom["scheduler"]["environment"]["ORCH_JOB_API_URL"] == "https://orch.example.org"
    assert custom["scheduler"]["environment"]["ORCH_SLURM_PYTHON"] == "/opt/o/bin/python"


def test_job_urls_that_could_not_work_elsewhere_are_refused() -> None:
    for bad in ("api:8000", "ftp://host/", "http://host:8000/?x=1", "http://user:pw@host", "http://host\n:8000"):
        with pytest.raises(ValueError, match="job_api_url"):
            Settings(job_api_url=bad)
    with pytest.raises(ValueError, match="slurm_python"):
        Settings(slurm_python="python3 -c evil")
    assert Settings(job_api_url="http://host:8000/").jobs_api_url == "http://host:8000"


def test_run_folders_live_on_the_shared_mount_at_the_same_path() -> None:
    """Job files, SLURM's --chdir and submitit's pickles name paths under ORCH_HOME: compute nodes must see
    them at the same path, so ORCH_HOME is a bind mount of the shared folder onto itself (no named volume)."""
    services = rendered()
    for name in ("api", "scheduler"):
        service = services[name]
        assert service["environment"]["ORCH_HOME"] == SHARED
        binds = {v["target"]: v for v in service["volumes"]}
        assert binds[SHARED]["type"] == "bind" and binds[SHARED]["source"] == SHARED
        assert not binds[SHARED].get("read_only")
        assert all(v["type"] == "bind" for v in service["volumes"])  # no named volume compute nodes cannot see
    for missing in ("ORCH_SHARED_DIR", "ORCH_PUBLIC_HOST"):
        result = compose("config", env={k: v for k, v in SECRETS.items() if k != missing})
        assert f"required variable {missing} is missing" in result.stderr and not result.stdout.strip()


def test_the_slurm_client_config_and_munge_socket_are_mounted() -> None:
    """sbatch, squeue, sacct and scancel in the scheduler (and the API, which cancels at once) need the
    cluster's slurm.conf and munged's socket on this host, which vouches for the container's uid."""
    services = rendered()
    for name in ("api", "scheduler"):
        binds = {v["target"]: v for v in services[name]["volumes"]}
        assert binds["/etc/slurm"]["source"] == "/etc/slurm" and binds["/etc/slurm"]["read_only"] is True
        assert binds["/run/munge"]["source"] == "/run/munge"
    moved = rendered({**SECRETS, "ORCH_SLURM_CONF_DIR": "/opt/slurm/etc", "ORCH_MUNGE_SOCKET_DIR": "/var/run/munge"})
    binds = {v["target"]: v["source"] for v in moved["scheduler"]["volumes"]}
    assert binds["/etc/slurm"] == "/opt/slurm/etc" and binds["/run/munge"] == "/var/run/munge"
    assert "sinfo" in " ".join(services["scheduler"]["healthcheck"]["test"])  # SLURM answers from inside
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "slurm-client" in dockerfile and "munge" in dockerfile


def test_the_image_user_is_the_clusters_service_account() -> None:
    """SLURM runs jobs as the submitting uid: the image's user takes the cluster account's uid and gid."""
    services = rendered({**SECRETS, "ORCH_UID": "2345", "ORCH_GID": "2346"})
    for name in ("api", "scheduler"):
        assert services[name]["build"]["args"] == {"ORCH_UID": "2345", "ORCH_GID": "2346"}
    assert rendered()["api"]["build"]["args"] == {"ORCH_UID": "10001", "ORCH_GID": "10001"}
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r'useradd [^\n]*--uid "\$\{ORCH_UID\}" --gid "\$\{ORCH_GID\}" orch', dockerfile)
    # the wheel stays in the image, so compute nodes install exactly the version the service runs
    assert "pip install /opt/orchestrator/wheels/*.whl" in dockerfile and "rm -rf /opt/orchestrator" not in dockerfile


def test_the_mlflow_artifact_store_is_handed_to_the_image_user_before_mlflow_starts() -> None:
    services = rendered()
    init, mlflow = services["mlflow-init"], services["mlflow"]
    assert init["user"] == "0" and init["restart"] == "no"
    assert "chown" in init["command"][0] and "/var/lib/mlflow/artifacts" in init["command"][0]
    assert [v["target"] for v in init["volumes"]] == ["/var/lib/mlflow"]
    assert init["volumes"][0]["source"] == mlflow["volumes"][0]["source"] == "mlflow-artifacts"
    assert mlflow["depends_on"]["mlflow-init"]["condition"] == "service_completed_successfully"
    assert "user" not in mlflow  # the server itself runs as the image's user


def test_evaluation_capacity_is_explicit_and_gpus_are_an_opt_in_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local jobs run in the leading scheduler's container: its slots are set, and docker/compose.gpu.yaml gives
    every scheduler replica the host's GPUs; without it the stack starts on a host with no GPU."""
    services = rendered({**SECRETS, "ORCH_LOCAL_EVAL_MAX_CONCURRENT": "4"})
    env = services["scheduler"]["environment"]
    assert env["ORCH_LOCAL_EVAL_MAX_CONCURRENT"] == "4" and env["ORCH_LOCAL_MAX_CONCURRENT"] == "1"
    monkeypatch.setenv("ORCH_LOCAL_EVAL_MAX_CONCURRENT", env["ORCH_LOCAL_EVAL_MAX_CONCURRENT"])
    assert Settings().local_eval_max_concurrent == 4
    assert not services["scheduler"].get("deploy", {}).get("resources")
    files = ("compose.yaml", "docker/compose.gpu.yaml")
    for gpus, count in (({}, -1), ({"ORCH_LOCAL_GPUS": "2"}, 2)):  # -1: all
        gpu = rendered({**SECRETS, **gpus}, files=files)
        [device] = gpu["scheduler"]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == count
        assert gpu["scheduler"]["deploy"]["replicas"] == 2  # whichever replica leads has the GPUs
        assert not gpu["api"].get("deploy", {}).get("resources")
