"""Ray launcher on Ray Job Submission: one job per attempt, `submission_id = spec.key` (idempotent).

With an address from settings (`http://head:8265`) it submits there. Without one it runs a private
single-node cluster for the service: `ray start --head --block` in its own session, every port on
127.0.0.1 and chosen free (so it never collides with another cluster on the machine), its own
`--temp-dir` (so its `ray_current_cluster` file never points another user's `ray.init()` at it), auth off.
`close()` stops it: SIGTERM to the blocking `ray start`, which tears down every process it started, then
the temp dir goes. It deliberately does not use `ray stop`, which kills every Ray process on the machine.
A service that exits stops it (`close()`, also at interpreter exit); one that crashed leaves it running,
recorded in the state folder, and adopts it when it comes back, so jobs survive a service crash.

The job runs the worker command from `spec.argv` in the run folder (no `working_dir` upload: same
machine); Ray sends SIGTERM on `stop_job`, and the worker checkpoints and exits 75.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator.jobs.files import EXIT_INTERRUPTED, read_result
from orchestrator.launchers.base import JobSpec, JobState, JobStatus, LauncherError
from orchestrator.settings import Settings
from trainer.files import atomic_write_text

CLUSTER_FILE = "local-cluster.json"
_PORT_OPTIONS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--node-manager-port",
    "--object-manager-port",
)


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are chosen, since a port released by one
    probe may be handed out again to the next (two Ray components on one port stop the cluster from starting)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _start_ticks(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and (ticks is None or _start_ticks(pid) == ticks)


def _session_members(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (the local cluster's processes, whatever their names)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _ms(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, UTC) if value else None


def _not_found(exc: Exception) -> bool:
    text = str(exc)
    return "404" in text or "does not exist" in text


class RayLauncher:
    name = "ray"

    def __init__(
        self,
        address: str | None,
        state_dir: Path,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        stop_wait_s: int = 30,
        start_timeout_s: float = 180.0,
    ) -> None:
        self.configured_address = address
        self.state_dir = Path(state_dir)
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.stop_wait_s, self.start_timeout_s = stop_wait_s, start_timeout_s
        self._address: str | None = address
        self._client_obj: Any = None
        self._owns_cluster = False

    # ------------------------------------------------------------------ the cluster

    @property
    def address(self) -> str | None:
        """The dashboard URL jobs go to (None until a local cluster runs)."""
        return self._address

    def _cluster_record(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.state_dir / CLUSTER_FILE).read_text())
            return data
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def _cluster_lock(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "local-cluster.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def ensure_cluster(self) -> str:
        """The address to submit to: the configured one, the local cluster a previous service left
        running (adopted), or a new local cluster."""
        if self._address is not None:
            return self._address
        with self._cluster_lock():
            record = self._cluster_record()
            if record and _alive(record["pid"], record.get("ticks")) and _answers(record["dashboard"]):
                self._address = record["dashboard"]
            else:
                if record:  # dead or unanswering leftovers of an earlier cluster
                    self._teardown(record)
                self._address = self._start_local()
            self._owns_cluster = True
            atexit.register(self.close)  # a service that exits stops its cluster; one that crashes leaves it
            return self._address

    def _start_local(self) -> str:
        *chosen, dashboard_metrics, autoscaler_metrics = _free_ports(len(_PORT_OPTIONS) + 2)
        ports = dict(zip(_PORT_OPTIONS, chosen, strict=True))
        dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
        temp_dir = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            *(f"{option}={port}" for option, port in ports.items()),
        ]
        if self.num_cpus is not None:
            command.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            command.append(f"--num-gpus={self.num_gpus}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            {
                "RAY_AUTH_MODE": "disabled",  # loopback only; token auth is Ray's default
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                # time the worker gets between SIGTERM (stop_job) and SIGKILL to write its checkpoint
                "RAY_JOB_STOP_WAIT_TIME_S": str(self.stop_wait_s),
                # a queued job waits for resources instead of failing after Ray's default 15 minutes
                "RAY_JOB_START_TIMEOUT_SECONDS": str(7 * 24 * 3600),
                "DASHBOARD_METRIC_PORT": str(dashboard_metrics),
                "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),
            }
        )
        log_path = self.state_dir / "local-cluster.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        record = {"pid": proc.pid, "ticks": _start_ticks(proc.pid), "dashboard": dashboard, "temp_dir": temp_dir}
        atomic_write_text(self.state_dir / CLUSTER_FILE, json.dumps(record))
        deadline = time.monotonic() + self.start_timeout_s
        while not _answers(dashboard):
            if proc.poll() is not None or time.monotonic() > deadline:
                self._teardown(record)
                tail = "".join(deque(log_path.open(errors="replace"), maxlen=15))
                raise LauncherError(f"the local Ray cluster did not start (see {log_path}):\n{tail}")
            time.sleep(0.5)
        return dashboard

    def _teardown(self, record: dict[str, Any]) -> None:
        """Stop a local cluster: SIGTERM to `ray start --block` (it stops what it started), then whatever
        is left in its session, then its temp dir (and the ray_current_cluster file in it)."""
        pid, ticks = int(record["pid"]), record.get("ticks")
        if _alive(pid, ticks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(pid, ticks) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # our child when we started it: reap it
                time.sleep(0.2)
        if ticks is None or _start_ticks(pid) in (None, ticks):
            deadline = time.monotonic() + 10
            while (members := _session_members(pid)) and time.monotonic() < deadline:
                time.sleep(0.2)  # processes still shutting down after `ray start` left
            for member in members:  # the session id is the `ray start` pid (setsid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        temp_dir = str(record.get("temp_dir") or "")
        if temp_dir.startswith("/tmp/orch-ray-"):
            shutil.rmtree(temp_dir, ignore_errors=True)
        (self.state_dir / CLUSTER_FILE).unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the local cluster this launcher started or adopted (a configured address is left alone)."""
        self._client_obj = None
        if not self._owns_cluster:
            return
        atexit.unregister(self.close)
        with self._cluster_lock():
            record = self._cluster_record()
            if record:
                self._teardown(record)
        self._owns_cluster = False
        self._address = self.configured_address

    def _client(self) -> Any:
        if self._client_obj is None:
            from ray.job_submission import JobSubmissionClient

            address = self.ensure_cluster()
            try:
                self._client_obj = JobSubmissionClient(address)
            except Exception as exc:  # requests' ConnectionError, Ray's RuntimeError, ...
                raise LauncherError(f"Ray at {address} does not answer: {exc}") from exc
        return self._client_obj

    # ------------------------------------------------------------------ submission

    def submission(self, spec: JobSpec) -> dict[str, Any]:
        """The JobSubmissionClient.submit_job arguments for the spec; submit and render share them."""
        res = spec.resources
        if res.nodes > 1:
            raise LauncherError("the Ray launcher runs one node per job; use SLURM for multi-node runs")
        argv = list(spec.argv)
        if res.gpus_per_node > 1 and argv[1:2] == ["-m"]:  # one process per GPU, as on SLURM
            argv = [argv[0], "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={res.gpus_per_node}"]
            argv += spec.argv[1:]
        submission: dict[str, Any] = {
            "submission_id": spec.key,
            "entrypoint": f"cd {shlex.quote(str(spec.workdir))} && exec {shlex.join(argv)}",
            "runtime_env": {"env_vars": {**spec.env, "ORCH_RUN_ID": spec.job_id, "ORCH_JOB_ID": spec.key}},
            "entrypoint_num_cpus": res.cpus_per_task * res.tasks_per_node,
            "entrypoint_memory": int(res.mem_gb * 2**30),
            "metadata": {
                "orch_run_id": spec.job_id,
                "orch_attempt": str(spec.attempt),
                "orch_run_dir": str(spec.workdir),
            },
        }
        if res.gpus_per_node:
            submission["entrypoint_num_gpus"] = res.gpus_per_node
        return submission

    def render(self, spec: JobSpec) -> str:
        address = self.address or "(a local single-node Ray cluster the service starts on first use)"
        return json.dumps({"address": address, **self.submission(spec)}, indent=2)

    def submit(self, spec: JobSpec) -> str:
        submission = self.submission(spec)
        client = self._client()
        try:
            client.get_job_info(spec.key)
            return spec.key  # submitted before (a service that crashed after submitting): never twice
        except Exception as exc:
            if not _not_found(exc):
                raise LauncherError(f"Ray job lookup failed: {exc}") from exc
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            return str(client.submit_job(**submission))
        except Exception as exc:
            if "already exists" in str(exc):
                return spec.key  # a concurrent submit of the same key won
            raise LauncherError(f"Ray refused the job: {str(exc)[:500]}") from exc

    # ------------------------------------------------------------------ following

    def _status(self, info: Any) -> JobStatus:
        from ray.job_submission import JobStatus as RayStatus

        address = getattr(info, "driver_agent_http_address", None)
        common: dict[str, Any] = {
            "host": urlparse(address).hostname if address else None,
            "started_at": _ms(info.start_time),
            "ended_at": _ms(info.end_time),
        }
        code = getattr(info, "driver_exit_code", None)
        status = info.status
        if status == RayStatus.PENDING:
            return JobStatus(JobState.PENDING, None, info.message or None, **{**common, "ended_at": None})
        if status == RayStatus.RUNNING:
            return JobStatus(JobState.RUNNING, None, None, **{**common, "ended_at": None})
        if status == RayStatus.SUCCEEDED:
            return JobStatus(JobState.COMPLETED, 0 if code is None else code, None, **common)
        if status == RayStatus.STOPPED:
            return JobStatus(JobState.CANCELLED, code, "stopped", **common)
        if code == EXIT_INTERRUPTED or self._interrupted(info.metadata or {}):
            return JobStatus(JobState.PREEMPTED, code, "interrupted: checkpoint written, resume to continue", **common)
        message = (info.message or "").strip().splitlines()
        reason = message[0] if message else (info.error_type or "failed")
        return JobStatus(JobState.FAILED, code, reason[:300], **common)

    @staticmethod
    def _interrupted(metadata: dict[str, str]) -> bool:
        """Without an exit code (driver killed, torchrun's own code), the worker's result file decides."""
        try:
            result = read_result(Path(metadata["orch_run_dir"]), int(metadata["orch_attempt"]))
        except (KeyError, ValueError):
            return False
        return result is not None and result.status == "interrupted"

    def poll(self, job_id: str) -> JobStatus:
        return self.poll_many([job_id])[job_id]

    def poll_many(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """One request: get_job_info for one job, list_jobs for several."""
        client = self._client()
        infos: dict[str, Any] = {}
        try:
            if len(job_ids) == 1:
                with contextlib.suppress(Exception):  # 404: unknown
                    infos[job_ids[0]] = client.get_job_info(job_ids[0])
                if job_ids[0] not in infos:  # tell "unknown" from "unreachable"
                    client.get_version()
            elif job_ids:
                wanted = set(job_ids)
                infos = {i.submission_id: i for i in client.list_jobs() if i.submission_id in wanted}
        except Exception as exc:
            raise LauncherError(f"Ray at {self.address} does not answer: {exc}") from exc
        return {
            job_id: self._status(infos[job_id])
            if job_id in infos
            else JobStatus(JobState.LOST, reason="unknown to the Ray cluster")
            for job_id in job_ids
        }

    def cancel(self, job_id: str) -> None:
        try:
            self._client().stop_job(job_id)
        except LauncherError:
            raise
        except Exception as exc:
            if not _not_found(exc):
                raise LauncherError(f"stopping Ray job {job_id} failed: {exc}") from exc

    def logs(self, job_id: str, tail: int = 200) -> str:
        try:
            text = str(self._client().get_job_logs(job_id))
        except LauncherError:
            raise
        except Exception:
            return ""
        lines = text.splitlines(keepends=True)
        return "".join(lines[-tail:]) if tail > 0 else ""

    def capacity(self) -> int | None:
        return None


def from_settings(settings: Settings, queue: str) -> RayLauncher:
    return RayLauncher(settings.ray_address, settings.home.resolve() / "ray")
