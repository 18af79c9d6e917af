"""SLURM launcher on submitit: sbatch options from the run's resources, one task per GPU, requeue on preemption.

Each SLURM task runs submitit's bootstrap, which calls `SlurmWorkerTask`: it starts the job's command (the
worker) as a child process and waits. The job name is the spec key, so a submit after a crash finds the job
it already made. States come from ONE `sacct` call for all jobs (accounting must be on).

Preemption and timeout follow submitit's checkpoint protocol:

* SLURM sends the submitit signal (`--signal=USR2@90`: 90 s before the time limit; `scancel --signal=USR2`
  for a manual preemption) to every process of the step. The worker child ignores that signal; in the
  rank-0 task submitit calls `SlurmWorkerTask.checkpoint()`, which sends SIGTERM to the worker (the trainer
  finishes its step, writes `checkpoint.pth`, writes `result-N.json` "interrupted" and exits 75), then
  returns a fresh task; submitit pickles it and runs `scontrol requeue`. The requeued job starts with
  `SLURM_RESTART_COUNT` + 1, so the same command becomes attempt N + 1 and resumes from the checkpoint.
* A plain SIGTERM (scancel, `scontrol requeue`, preemption by SLURM) also reaches the worker, which
  checkpoints and exits 75; a task that ends with 75 makes the job exit 75, reported as PREEMPTED unless
  SLURM says CANCELLED or has requeued the job itself (then it shows as PENDING with restarts + 1).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from orchestrator.jobs.files import EXIT_INTERRUPTED
from orchestrator.launchers.base import SLURM_EXTRA_WHITELIST, JobSpec, JobState, JobStatus, LauncherError
from orchestrator.settings import Settings
from trainer.files import atomic_write_text

DEFAULT_SIGNAL, DEFAULT_SIGNAL_DELAY_S = "USR2", 90
_SIGNAL_RE = re.compile(r"^(?:R:)?(?:SIG)?(USR1|USR2)(?:@(\d{1,5}))?$")
#: How far back `submit` looks in accounting for a job with the same key.
LOOKBACK = "now-60days"

_PENDING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "RESIZING", "RESV_DEL_HOLD"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "SUSPENDED", "STOPPED"}
_FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}
#: A job (`123`) or one task of a job array (`123_4`).
_JOB_ID_RE = re.compile(r"^\d+(_\d+)?$")
_SACCT_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "NodeList", "Reason")


class SlurmWorkerTask:
    """The submitit callable of every SLURM task: run the job's command, stop it at a checkpoint on demand.

    It holds only the command (no training state), so the pickle submitit saves at requeue is never stale:
    the worker reads its progress from the run folder and its attempt number from SLURM_RESTART_COUNT.
    """

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], preempt_signal: str = DEFAULT_SIGNAL) -> None:
        self.argv, self.cwd, self.env, self.preempt_signal = list(argv), cwd, dict(env), preempt_signal
        self._pid: int | None = None
        self._code: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"argv": self.argv, "cwd": self.cwd, "env": self.env, "preempt_signal": self.preempt_signal}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _reap(self, block: bool) -> int | None:
        """Exit code of the child; safe from the main loop and from a signal handler that interrupts it."""
        if self._code is not None or self._pid is None:
            return self._code
        try:
            pid, status = os.waitpid(self._pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped by the other caller (handler vs main loop)
            if self._code is None:
                print(f"orchestrator: worker pid {self._pid} vanished without an exit status", file=sys.stderr)
                self._code = 1
            return self._code
        if pid == 0:
            return None
        self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def _forward(self, signum: int, _frame: FrameType | None = None) -> None:
        if self._pid is not None and self._code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signum)

    def __call__(self) -> int:
        # The submitit signal is for this wrapper (it calls checkpoint()); the worker must not die of it.
        ignored = signal.SIGUSR2 if self.preempt_signal == "USR2" else None

        def child_setup() -> None:
            if ignored is not None:
                signal.signal(ignored, signal.SIG_IGN)

        # submitit ignores SIGTERM in this wrapper; pass it on so the worker checkpoints (scancel, requeue)
        signal.signal(signal.SIGTERM, self._forward)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        child = subprocess.Popen(self.argv, cwd=self.cwd, env=env, preexec_fn=child_setup)
        self._pid = child.pid
        try:
            code = self._reap(block=True)
        except Exception as exc:
            # submitit's handler raises here when it will not requeue (e.g. "timed-out too many times")
            # after checkpoint() already stopped the worker: report the interruption, not a failure
            if self._code == EXIT_INTERRUPTED:
                print(f"orchestrator: not requeued by submitit ({exc}); exiting 75", file=sys.stderr)
                raise SystemExit(EXIT_INTERRUPTED) from exc
            raise
        assert code is not None
        child.returncode = code  # reaped with waitpid: keep Popen from waiting again
        if code != 0:
            raise SystemExit(code if code > 0 else 128 - code)  # the task's exit code becomes the job's
        return code

    def checkpoint(self) -> Any:
        """submitit's protocol, on the preemption/timeout signal (rank 0): stop the worker at a checkpoint,
        then hand submitit a fresh task to pickle for the requeued job."""
        from submitit.helpers import DelayedSubmission

        if self._pid is not None and self._code is None:
            self._forward(signal.SIGTERM)
            self._reap(block=True)
        return DelayedSubmission(SlurmWorkerTask(self.argv, self.cwd, self.env, self.preempt_signal))


def _run(command: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise LauncherError(f"SLURM is not available here: {command[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise LauncherError(f"{shlex.join(command)} did not answer in {timeout:.0f} s") from exc


def _time(value: str) -> datetime | None:
    if not value or value in ("Unknown", "None"):
        return None
    try:
        return datetime.fromisoformat(value).astimezone(UTC)  # sacct prints the cluster's local time
    except ValueError:
        return None


def _exit(value: str) -> tuple[int | None, int]:
    """sacct's ExitCode 'code:signal'."""
    code, _, sig = value.partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError:
        return None, 0


def status_from_sacct(records: list[dict[str, str]]) -> JobStatus:
    """Map the accounting records of one job (oldest first, one per requeue) to a JobStatus."""
    rec = records[-1]
    state = (rec.get("State") or "").split(" ")[0].rstrip("+")
    code, sig = _exit(rec.get("ExitCode", ""))
    exit_code = -sig if sig else code
    host = rec.get("NodeList") or None
    if host == "None assigned":
        host = None
    reason = rec.get("Reason") or None
    if reason == "None":
        reason = None
    common: dict[str, Any] = {
        "host": host,
        "started_at": _time(rec.get("Start", "")),
        "ended_at": _time(rec.get("End", "")),
        "restarts": len(records) - 1,
    }
    if state in _PENDING:
        why = reason or ("requeued" if len(records) > 1 else None)
        return JobStatus(JobState.PENDING, None, why, **{**common, "ended_at": None})
    if state in _RUNNING:
        return JobStatus(JobState.RUNNING, None, state.lower() if state != "RUNNING" else None, **common)
    if state == "COMPLETED":
        return JobStatus(JobState.COMPLETED, exit_code, None, **common)
    if state == "CANCELLED":
        return JobStatus(JobState.CANCELLED, exit_code, rec.get("State"), **common)
    if code == EXIT_INTERRUPTED and not sig:
        return JobStatus(JobState.PREEMPTED, exit_code, f"{state}: interrupted (exit 75), resume", **common)
    if state == "PREEMPTED":  # never 'done' (submitit PR #1770): resubmit to resume
        return JobStatus(JobState.PREEMPTED, exit_code, "PREEMPTED", **common)
    if state in _FAILED:
        return JobStatus(JobState.FAILED, exit_code, state, **common)
    return JobStatus(JobState.FAILED, exit_code, f"unknown SLURM state {state or '?'}", **common)


def parse_signal(extra: dict[str, str]) -> tuple[str, int]:
    """The submitit preemption signal and its lead time; `resources.extra.signal` may change them."""
    value = extra.get("signal")
    if value is None:
        return DEFAULT_SIGNAL, DEFAULT_SIGNAL_DELAY_S
    match = _SIGNAL_RE.match(value.strip().upper())
    if match is None:
        raise LauncherError(
            f"resources.extra.signal={value!r}: use USR1[@seconds] or USR2[@seconds] (the signal submitit turns "
            "into checkpoint + requeue; SIGTERM already means cancel, and B: would miss the training processes)"
        )
    return match.group(1), int(match.group(2) or DEFAULT_SIGNAL_DELAY_S)


def _refuse_control_characters(params: dict[str, Any]) -> None:
    """The last guard before submitit writes the script: a value with a newline would become a shell line
    of its own (values are validated on the way in; a Resources built without validation is not)."""

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(key, where)
                walk(item, f"{where}.{key}")
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, where)
        elif isinstance(value, str) and any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise LauncherError(f"sbatch option {where} holds a control character; refused")

    walk(params, "resources")


def _truthy(value: str) -> bool | None:
    lowered = value.strip().lower()
    if lowered in ("", "1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    return None


#: What a job inherits from the service's environment (sbatch --export): what a process needs to run, never
#: the service's secrets (ORCH_SECRET_KEY, the database URL, tokens), which sbatch would otherwise pass on.
JOB_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_HOME")


#: Set by submitit's batch script for its srun step: sbatch's --export list becomes srun's (SLURM_EXPORT_ENV),
#: so it must name them although the service has not set them.
SUBMITIT_ENVIRONMENT = ("SUBMITIT_EXECUTOR", "SUBMITIT_PREEMPT_SIGNAL")


def job_environment(extra: tuple[str, ...] = ()) -> str:
    """The --export value: the listed variables the service has set, and submitit's (SLURM adds SLURM_*)."""
    names = [name for name in dict.fromkeys((*JOB_ENVIRONMENT, *extra)) if name in os.environ]
    return ",".join([*names, *SUBMITIT_ENVIRONMENT])


class SlurmLauncher:
    name = "slurm"

    def __init__(
        self,
        state_dir: Path,
        default_partition: str | None = None,
        python: str | None = None,
        max_num_timeout: int = 3,
        job_python: str | None = None,
        export_env: tuple[str, ...] = (),
    ) -> None:
        self.state_dir = Path(state_dir)
        self.export_env = export_env  # variables jobs inherit beyond JOB_ENVIRONMENT
        self.default_partition = default_partition
        self.python = job_python or python or sys.executable
        self.max_num_timeout = max_num_timeout
        # the nodes' interpreter, when the service's own path does not exist there (a container): it starts
        # submitit's bootstrap and replaces the interpreter of the job's command
        self.job_python = job_python

    # ------------------------------------------------------------------ submission

    @staticmethod
    def folder(spec: JobSpec) -> Path:
        """submitit's folder for this attempt (one sub-folder per job id), next to the run's other logs."""
        return spec.log_dir / "slurm" / "%j"

    def parameters(self, spec: JobSpec) -> dict[str, Any]:
        """SlurmExecutor parameters (sbatch options) for the spec; submit and render share them."""
        from submitit.slurm.slurm import _convert_mem

        res = spec.resources
        extra = res.extra_options()
        refused = sorted(set(extra) - SLURM_EXTRA_WHITELIST)  # Resources validates this; a constructed one may not
        if refused:
            raise LauncherError(f"sbatch options not allowed: {', '.join(refused)}")
        sig, delay = parse_signal(extra)
        extra.pop("signal", None)
        additional: dict[str, Any] = {
            "signal": f"{sig}@{delay}",
            "chdir": str(spec.workdir),
            "requeue": True,
            "export": job_environment(self.export_env),
        }
        params: dict[str, Any] = {
            "job_name": spec.key,
            "time": res.time_min,
            "nodes": res.nodes,
            "ntasks_per_node": res.tasks_per_node,  # one training process per GPU
            "cpus_per_task": res.cpus_per_task,
            "mem": _convert_mem(res.mem_gb),
            "stderr_to_stdout": True,
            # SLURM 22.05's srun no longer inherits --cpus-per-task from sbatch: without this each task gets 1 CPU
            "srun_args": [f"--cpus-per-task={res.cpus_per_task}"],
            "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={sig}"],
        }
        if res.gpus_per_node:
            params["gres"] = f"gpu:{res.gpus_per_node}"
        for key, value in (("partition", res.partition or self.default_partition), ("account", res.account)):
            if value:
                params[key] = value
        if res.qos:
            params["qos"] = res.qos
        for key, value in extra.items():
            if key == "requeue":
                flag = _truthy(value)
                if flag is None:
                    raise LauncherError(f"resources.extra.requeue={value!r}: use true or false")
                if not flag:
                    additional.pop("requeue")
                    additional["no-requeue"] = True
            elif key == "exclusive":
                flag = _truthy(value)
                if flag is not False:
                    params["exclusive"] = True if flag else value
            elif key in ("constraint", "exclude", "nodelist", "comment", "mail_type", "mail_user", "gres"):
                params[key] = value
            elif key == "dependency":
                params["dependency"] = value
            else:  # reservation, begin, nice, licenses: plain sbatch flags
                additional[key] = value
        params["additional_parameters"] = additional
        _refuse_control_characters(params)
        return params

    def task(self, spec: JobSpec) -> SlurmWorkerTask:
        sig, _ = parse_signal(spec.resources.extra_options())
        env = {**spec.env, "ORCH_RUN_ID": spec.job_id}
        argv = [self.job_python, *spec.argv[1:]] if self.job_python and spec.argv else spec.argv
        return SlurmWorkerTask(argv, str(spec.workdir), env, sig)

    def _executor(self, spec: JobSpec, render_only: bool) -> Any:
        from submitit.slurm.slurm import SlurmExecutor

        cls: Any = _render_executor_class() if render_only else SlurmExecutor
        try:
            executor = cls(self.folder(spec), max_num_timeout=self.max_num_timeout, python=shlex.quote(self.python))
        except RuntimeError as exc:  # no srun on PATH
            raise LauncherError(f"SLURM is not available here: {exc}") from exc
        try:
            executor.update_parameters(**self.parameters(spec))
        except ValueError as exc:
            raise LauncherError(f"invalid sbatch options: {exc}") from exc
        return executor

    def render(self, spec: JobSpec) -> str:
        executor = self._executor(spec, render_only=True)
        script: str = executor._make_submission_file_text(executor._submitit_command_str, "render")
        task = self.task(spec)
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(task.env.items()))
        return (
            script.rstrip("\n")
            + "\n\n# submitit runs orchestrator.launchers.slurm.SlurmWorkerTask in each task, which starts:\n"
            + f"#   cd {shlex.quote(task.cwd)} && {env} {shlex.join(task.argv)}\n"
        )

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """Two submits of one key on this machine run one after the other (the second finds the first)."""
        locks = self.state_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def find(self, key: str) -> str | None:
        """The job id already submitted under this key: our index, then squeue, then accounting."""
        try:
            return (self.state_dir / "keys" / key).read_text().strip() or None
        except OSError:
            pass
        # -t all: also jobs that just ended (kept for MinJobAge); right after a job ends, sacct --name may
        # briefly miss it (seen with slurmdbd 22.05), while the controller still knows it
        # %F and JobID's prefix: the array's id for an array, the job's own id otherwise
        out = _run(["squeue", "-h", "-t", "all", "-n", key, "-o", "%F"])
        ids = [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]
        if not ids:
            out = _run(["sacct", "-X", "-n", "-P", "--name", key, "-o", "JobID", "-S", LOOKBACK])
            ids = [line.strip().split("_")[0] for line in out.stdout.splitlines()]
            ids = [i for i in ids if i.isdigit()]
        return max(ids, key=int) if ids else None

    def submit(self, spec: JobSpec) -> str:
        executor = self._executor(spec, render_only=False)
        with self._key_lock(spec.key):
            found = self.find(spec.key)
            if found is not None:
                self._remember(spec, found)
                return found  # submitted before (a service that crashed after sbatch): never twice
            spec.log_dir.mkdir(parents=True, exist_ok=True)
            from submitit.core.utils import FailedJobError

            try:
                job = executor.submit(self.task(spec))
            except FailedJobError as exc:
                raise LauncherError(f"sbatch refused the job: {str(exc).strip()[:500]}") from exc
            job_id = str(job.job_id)
            self._remember(spec, job_id)
        return job_id

    def submit_array(self, specs: list[JobSpec], parallelism: int) -> list[str]:
        """One `sbatch --array=0-N%P` (submitit's batch) for specs with the same resources; task i runs spec i.

        Idempotent like `submit`: before sbatch, each spec's key is written down with the array's name and
        index, so a service that crashed after sbatch finds the array by name and its tasks by index."""
        if len({json.dumps(s.resources.model_dump(mode="json"), sort_keys=True) for s in specs}) > 1:
            raise LauncherError("a job array needs the same resources for every task")
        ids: dict[str, str] = {}
        name = "orch-array-" + hashlib.sha256(" ".join(s.key for s in specs).encode()).hexdigest()[:16]
        with self._key_lock(name):
            todo = []
            for spec in specs:
                found = self._submitted_before(spec)
                if found is not None:
                    ids[spec.key] = found
                else:
                    todo.append(spec)
            if todo:
                for index, spec in enumerate(todo):
                    atomic_write_text(self.state_dir / "intents" / spec.key, f"{name} {index}")
                array_id = self.find(name) or self._sbatch_array(name, todo, parallelism)
                for index, spec in enumerate(todo):
                    ids[spec.key] = f"{array_id}_{index}"
                    self._remember(spec, ids[spec.key], self.array_folder(array_id, index))
        return [ids[spec.key] for spec in specs]

    def array_folder(self, array_id: str, index: int) -> Path:
        """submitit's folder of one array task (the `%j` of the array's folder is `A_i`)."""
        return self.state_dir / "arrays" / f"{array_id}_{index}"

    def _submitted_before(self, spec: JobSpec) -> str | None:
        """The id of a spec submitted alone or in an array (found through its intent after a crash)."""
        try:
            return (self.state_dir / "keys" / spec.key).read_text().strip() or None
        except OSError:
            pass
        try:
            name, index = (self.state_dir / "intents" / spec.key).read_text().split()
        except (OSError, ValueError):
            return None
        array_id = self.find(name)
        if array_id is None:
            return None
        self._remember(spec, f"{array_id}_{index}", self.array_folder(array_id, int(index)))
        return f"{array_id}_{index}"

    def _sbatch_array(self, name: str, specs: list[JobSpec], parallelism: int) -> str:
        from submitit.core.utils import FailedJobError
        from submitit.slurm.slurm import SlurmExecutor

        folder = self.state_dir / "arrays" / "%j"
        executor = SlurmExecutor(folder, self.max_num_timeout, python=shlex.quote(self.python))
        params = self.parameters(specs[0])
        params["job_name"], params["array_parallelism"] = name, max(1, parallelism)
        params["additional_parameters"]["chdir"] = str(self.state_dir)  # each task's worker runs in its own folder
        try:
            executor.update_parameters(**params)
        except ValueError as exc:
            raise LauncherError(f"invalid sbatch options: {exc}") from exc
        try:
            with executor.batch():
                jobs = [executor.submit(self.task(spec)) for spec in specs]
        except FailedJobError as exc:
            raise LauncherError(f"sbatch refused the array: {str(exc).strip()[:500]}") from exc
        return str(jobs[0].job_id).split("_")[0]

    def _remember(self, spec: JobSpec, job_id: str, folder: Path | None = None) -> None:
        folder = folder or Path(str(self.folder(spec)).replace("%j", job_id))
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        link = spec.log_dir / f"attempt-{spec.attempt}.log"
        with contextlib.suppress(OSError):
            if not link.exists() and not link.is_symlink():
                link.symlink_to(self._stdout(folder, job_id))
        record: dict[str, Any] = {"key": spec.key, "job_id": job_id, "folder": str(folder)}
        record |= {"run_id": spec.job_id, "attempt": spec.attempt}
        atomic_write_text(self.state_dir / "jobs" / f"{job_id}.json", json.dumps(record))
        atomic_write_text(self.state_dir / "keys" / spec.key, job_id)

    # ------------------------------------------------------------------ following

    def poll(self, job_id: str) -> JobStatus:
        return self.poll_many([job_id])[job_id]

    def poll_many(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """One sacct call for all jobs (with -D: one record per requeue, so restarts = records - 1)."""
        ids = sorted({str(j) for j in job_ids if _JOB_ID_RE.match(str(j))})
        result: dict[str, JobStatus] = {
            j: JobStatus(JobState.LOST, reason=f"not a SLURM job id: {j!r}") for j in job_ids if j not in ids
        }
        if not ids:
            return result
        out = _run(["sacct", "-D", "-X", "-n", "-P", "-o", ",".join(_SACCT_FIELDS), "-j", ",".join(ids)])
        if out.returncode != 0:
            raise LauncherError(f"sacct failed: {out.stderr.strip()[:300]}")
        records: dict[str, list[dict[str, str]]] = {}
        for line in out.stdout.splitlines():
            values = line.split("|")
            if len(values) != len(_SACCT_FIELDS):
                continue
            rec = dict(zip(_SACCT_FIELDS, values, strict=True))
            records.setdefault(rec["JobID"], []).append(rec)  # an array task keeps "A_i" across requeues
        missing = [j for j in ids if j not in records]
        queued = self._squeue(missing) if missing else {}
        for job_id in ids:
            if job_id in records:
                result[job_id] = status_from_sacct(records[job_id])
            elif job_id in queued:
                result[job_id] = queued[job_id]
            else:
                result[job_id] = JobStatus(JobState.LOST, reason="unknown to SLURM accounting and to squeue")
        return result

    @staticmethod
    def _squeue(job_ids: list[str]) -> dict[str, JobStatus]:
        """Jobs the controller knows but accounting has not (yet) answered for: just submitted or just ended,
        and array tasks still pending (accounting holds them as one `A_[1-3%2]` record until they start)."""
        fields = "JobID:|,ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,NodeList:|,exit_code:|"
        out = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-O", fields])
        found: dict[str, JobStatus] = {}
        for line in out.stdout.splitlines():
            values = [v.strip() for v in line.split("|")]
            if len(values) < 7 or not values[0].isdigit():
                continue
            raw_id, array_id, task, state, reason, node, raw = values[:7]
            job_id = f"{array_id}_{task}" if task.isdigit() else raw_id
            status = int(raw) if raw.isdigit() else 0  # a wait status: code << 8 | signal
            exit_code = f"{status >> 8}:{status & 0x7F}"
            record = {"State": state, "ExitCode": exit_code, "Reason": reason, "NodeList": node or "None assigned"}
            found[job_id] = status_from_sacct([record])
        return found

    def cancel(self, job_id: str) -> None:
        out = _run(["scancel", str(job_id)])
        if out.returncode != 0 and "Invalid job id" not in out.stderr and "already completing" not in out.stderr:
            raise LauncherError(f"scancel {job_id} failed: {out.stderr.strip()[:300]}")

    # ------------------------------------------------------------------ logs

    @staticmethod
    def _stdout(folder: Path, job_id: str) -> Path:
        return folder / f"{job_id}_0_log.out"  # task 0 (rank 0); stderr goes to the same file

    def _job_folder(self, job_id: str) -> Path | None:
        try:
            return Path(json.loads((self.state_dir / "jobs" / f"{job_id}.json").read_text())["folder"])
        except (OSError, ValueError, KeyError):
            pass
        out = _run(["sacct", "-X", "-n", "-P", "-o", "WorkDir", "-j", str(job_id)])  # chdir = the run folder
        workdir = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
        return Path(workdir[0]) / "logs" / "slurm" / str(job_id) if workdir and workdir[0] else None

    def logs(self, job_id: str, tail: int = 200) -> str:
        folder = self._job_folder(job_id)
        if folder is None:
            return ""
        try:
            with open(self._stdout(folder, job_id), errors="replace") as handle:
                return "".join(deque(handle, maxlen=tail))
        except OSError:
            return ""

    def capacity(self) -> int | None:
        return None


@functools.cache
def _render_executor_class() -> Any:
    """submitit's own SLURM executor minus its check for srun, so scripts render on any machine."""
    from submitit.slurm.slurm import SlurmExecutor

    class RenderExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    return RenderExecutor


def from_settings(settings: Settings, queue: str) -> SlurmLauncher:
    """One launcher for both queues: evaluations pick their partition/QoS through their resources."""
    return SlurmLauncher(
        settings.home.resolve() / "slurm",
        default_partition=settings.slurm_partition,
        python=settings.python,
        job_python=settings.slurm_python,
        export_env=settings.slurm_export_names,
    )
