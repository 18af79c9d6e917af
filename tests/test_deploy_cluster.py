"""The compose stack's processes against the real SLURM cluster (`scripts/services.sh start`), as deployed.

What compose.yaml runs, minus Docker (no engine here): the project as the image installs it (a non-editable
wheel in a fresh virtual environment, run from outside the repository), `orchestrator serve --no-reconciler`
and `orchestrator scheduler` on PostgreSQL, an MLflow server with proxied artifacts and the compose file's
`--allowed-hosts`. The compose-network names stay in the in-network settings (`ORCH_API_URL=http://api:8000`
resolves nowhere here), the URLs for jobs are this host's name (`ORCH_JOB_API_URL`,
`ORCH_JOB_MLFLOW_TRACKING_URI`), ORCH_HOME is the "shared" folder, and `ORCH_PYTHON` is a path that exists
only in the image while `ORCH_SLURM_PYTHON` names the nodes' interpreter. A micro run submitted over REST must
then run on SLURM and succeed with everything it reports arriving through the external URLs.

The image installs the wheel's dependencies too; here they come from the project's virtual environment
(`tests.support.install_wheel`), not a 6.5 GB reinstall of torch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.support import ADMIN, MICRO, REPO, Installed, get, install_wheel, settled, submit, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]  # a real cluster; builds a wheel and trains a micro run

SECRET = "deploy-test-secret"
RESOURCES = {"cpus_per_task": 1, "mem_gb": 2, "time_min": 20}
#: What the containers have and compute nodes do not (the image's interpreter): SLURM jobs must not use it.
IMAGE_PYTHON = "/opt/image-only/bin/python"


@pytest.fixture(scope="module")
def slurm_up() -> None:
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not any(state in probe.stdout for state in ("idle", "mixed", "allocated")):
        raise RuntimeError(f"no SLURM cluster answers (run scripts/services.sh start): {probe.stderr.strip()}")


def clean_env() -> dict[str, str]:
    """The environment a container starts with: nothing of this test process's settings or paths."""
    drop = ("ORCH_", "PYTHONPATH", "MLFLOW_", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The Dockerfile's two stages: `pip wheel --no-deps .`, then the wheel installed (not editable)."""
    return install_wheel(tmp_path_factory.mktemp("image"))


def host_name() -> str:
    """This machine's name as "compute nodes" (here: this machine) reach the service: not an in-network
    name, not a loopback literal, and one MLflow's default Host guard would refuse."""
    name = socket.gethostname()
    socket.getaddrinfo(name, None)  # resolvable, or the test cannot stand in for a cluster
    assert name not in ("localhost", "api", "mlflow"), name
    return name


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    def ready() -> bool:
        assert proc.poll() is None, f"{what} exited: {log.read_text()[-3000:]}"
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 120, what)


class Processes:
    """The stack's processes, each in its own session with its log in a file; all stopped at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.folder / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 (closed in stop_all)
        proc = subprocess.Popen(
            argv, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.running.append((proc, log))
        return proc, log_path

    def stop_all(self) -> None:
        for proc, log in reversed(self.running):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait(timeout=10)
            log.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    folder = tmp_path / "outside-the-repository"
    folder.mkdir()
    procs = Processes(folder)
    try:
        yield procs
    finally:
        procs.stop_all()


def free_port_any() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_stack_runs_a_job_on_slurm_that_reports_through_the_external_urls(
    tmp_path: Path, installed: Installed, processes: Processes, db_url: str, slurm_up: None
) -> None:
    # -- the installed copy is the wheel, outside the repository
    where = subprocess.run(
        [str(installed.python), "-c", "import orchestrator, api, trainer; print(orchestrator.__file__)"],
        cwd=processes.folder,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.startswith(str(installed.site_packages)) and str(REPO) not in where.stdout
    direct = next(installed.site_packages.glob("selfpatch_orchestrator-*.dist-info")) / "direct_url.json"
    assert "editable" not in direct.read_text()

    host = host_name()
    with pytest.raises(OSError):
        socket.getaddrinfo("api", 8000)  # the in-network name must not work here, or the proof below is void
    shared = tmp_path / "shared" / "orchestrator"  # the folder compute nodes mount at the same path
    shared.mkdir(parents=True)
    api_port, mlflow_port = free_port_any(), free_port_any()
    internal_mlflow = f"http://127.0.0.1:{mlflow_port}"
    external_api, external_mlflow = f"http://{host}:{api_port}", f"http://{host}:{mlflow_port}"

    # -- MLflow as compose runs it: proxied artifacts, the Host guard told about this host's name
    mlflow_dir = tmp_path / "mlflow"
    mlflow, mlflow_log = processes.start(
        "mlflow",
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host=0.0.0.0",
            f"--port={mlflow_port}",
            "--workers=1",
            f"--backend-store-uri=sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--serve-artifacts",
            f"--artifacts-destination={mlflow_dir / 'artifacts'}",
            f"--allowed-hosts=mlflow:5000,localhost:{mlflow_port},127.0.0.1:{mlflow_port},{host}:{mlflow_port}",
        ],
        {**clean_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    wait_http(f"{internal_mlflow}/health", mlflow, mlflow_log, "the MLflow server")

    # -- the API replica and the scheduler, with compose's settings
    env = {
        **clean_env(),
        "ORCH_DATABASE_URL": db_url,
        "ORCH_HOME": str(shared),
        "ORCH_MLFLOW_TRACKING_URI": internal_mlflow,
        "ORCH_API_URL": "http://api:8000",
        "ORCH_JOB_API_URL": external_api,
        "ORCH_JOB_MLFLOW_TRACKING_URI": external_mlflow,
        "ORCH_PYTHON": IMAGE_PYTHON,
        "ORCH_SLURM_PYTHON": str(installed.python),
        "ORCH_ADMIN_TOKENS": f"admin:{ADMIN}",
        "ORCH_SECRET_KEY": SECRET,
        "ORCH_DEFAULT_LAUNCHER": "slurm",
        "ORCH_RECONCILE_INTERVAL_S": "0.5",
    }
    cli = str(installed.env_dir / "bin" / "orchestrator")
    serve = [cli, "serve", "--host", "0.0.0.0", "--port", str(api_port), "--no-reconciler", "--log-level", "warning"]
    api, api_log = processes.start("api", serve, env)
    processes.start("scheduler", [cli, "scheduler"], env)
    wait_http(f"http://127.0.0.1:{api_port}/readyz", api, api_log, "the API")
    url = f"http://127.0.0.1:{api_port}"

    # -- a micro run over REST; nothing names the launcher: the deployment's default is SLURM
    run = submit(url, {"experiment": "deploy", "preset": "tiny_cpu", "overrides": MICRO, "resources": RESOURCES})
    run_id = run["id"]
    try:
        final = settled(url, f"/runs/{run_id}", 600)
    finally:
        last = get(url, f"/runs/{run_id}")["attempts"]
        if last and last[-1]["backend_job_id"]:
            subprocess.run(["scancel", last[-1]["backend_job_id"]], capture_output=True, check=False)
    logs = {p.name: p.read_text()[-3000:] for p in processes.folder.glob("*.log")}
    assert final["status"] == "succeeded", (final["status_reason"], logs)

    # it ran on SLURM, in the shared folder, with the nodes' interpreter
    [attempt] = final["attempts"]
    job_id = attempt["backend_job_id"]
    assert attempt["backend"] == "slurm" and job_id.isdigit() and attempt["exit_code"] == 0
    folder = shared / "runs" / run_id
    sacct = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,WorkDir"], capture_output=True, text=True, check=True
    )
    assert sacct.stdout.split() == [f"COMPLETED|{folder}"], sacct.stdout
    submitit_dir = folder / "logs" / "slurm" / job_id
    script = (submitit_dir / f"{job_id}_submission.sh").read_text()
    assert f"{installed.python} -u -m submitit.core._submit" in script and IMAGE_PYTHON not in script
    assert (submitit_dir / f"{job_id}_0_log.out").is_file()

    # its files are in the shared folder: job file, result, checkpoints
    job_file = json.loads((folder / "job.json").read_text())
    assert job_file["api_url"] == external_api and job_file["mlflow_tracking_uri"] == external_mlflow
    result = json.loads((folder / "result-1.json").read_text())
    assert result["status"] == "completed" and result["attempt"] == 1
    assert (folder / "train" / "checkpoint.pth").is_file() and Path(result["checkpoint"]).is_relative_to(folder)

    # its reports arrived, and the only API URL the job had is the external one: start (total_iterations),
    # heartbeat (metrics) and end (a job_end event in the job's own name)
    assert final["progress"]["total_iterations"] > 0 and "train/loss" in final["progress"]["metrics"]
    events: list[dict[str, Any]] = get(url, f"/runs/{run_id}/events?page_size=200")["items"]
    assert any(e["kind"] == "job_end" and e["actor"] == "job:attempt-1" for e in events), events
    checkpoints = get(url, f"/runs/{run_id}/checkpoints")
    assert checkpoints and all(Path(c["path"]).is_relative_to(folder) for c in checkpoints)

    # the job logged to MLflow through its external URL: metrics, and artifacts uploaded through the server
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=internal_mlflow)
    mlflow_run = final["mlflow_run_id"]
    assert mlflow_run and client.get_metric_history(mlflow_run, "train/loss")
    assert [a.path for a in client.list_artifacts(mlflow_run, "export") if a.path.endswith("manifest.json")]
    assert client.get_run(mlflow_run).data.tags.get("orch.slurm_job_id") == job_id
