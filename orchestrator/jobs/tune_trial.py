"""One Ray Tune trial of a search: a run of the sweep, started through the service and followed epoch by epoch.

`TrialTrainable` (Tune's class API; one `step` is one epoch of the run):

* `setup` registers the trial with the service (`POST /searches/{id}/trials` with the search job's token):
  the service checks the sampled values against the search space and records the trial run (the same Tune
  trial id again, after a restore, gets the same run).
* `step` waits until the service lets an attempt run (`tune/launch-N.json`, see `orchestrator.launchers.tune`),
  starts `python -m orchestrator.jobs FOLDER --attempt N` (the job runner of every run, which resumes from
  the run's own checkpoint) and returns after each epoch the trainer logs, with the sweep's primary metric:
  a training metric of that epoch (`train/loss`) or the monitor benchmark on that epoch's checkpoint (the
  online k-NN of the teacher).
* `cleanup` stops the runner if it still runs (SIGTERM: checkpoint, exit 75; or, when ASHA stopped the trial,
  end `stopped`, because `ExplainedASHA` left a stop request with its reason first).

The runner is the trainable's child and dies with it (PR_SET_PDEATHSIG), so a killed search leaves no
orphan training; the service then sees the trial's attempt file fall silent and requeues it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from ray.tune import Trainable
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from orchestrator.jobs.files import JobFile, read_result, request_stop
from orchestrator.launchers.tune import (
    ALIVE_EVERY_S,
    METRICS_FILE,
    attempt_path,
    cancel_path,
    closed_path,
    launched_attempt,
    mailbox,
    write_attempt,
)
from trainer.files import atomic_write_text

log = logging.getLogger("orchestrator.jobs")
#: The key every trial reports its objective under (the sweep's primary metric may contain `/`).
TRIAL_METRIC = "objective"


@dataclass(frozen=True)
class SearchContext:
    """What every trial of one search needs to know, passed by `tune.with_parameters`."""

    trials_url: str
    token: str
    metric: str
    epochs: int
    monitor: dict[str, Any] | None = None

    def register(self, tune_trial_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's run, from the service (retried while the service restarts)."""
        delay, last = 0.5, ""
        for _ in range(12):
            try:
                response = httpx.post(
                    self.trials_url,
                    json={"tune_trial_id": tune_trial_id, "params": params},
                    headers={"Authorization": f"Bearer {self.token}"},
                    timeout=30,
                )
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise RuntimeError(f"the service refused trial {tune_trial_id}: {response.text[:500]}")
                    found: dict[str, Any] = response.json()
                    return found
                last = response.text[:200]
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        raise RuntimeError(f"could not register trial {tune_trial_id} with the service: {last}")


def _plain(value: Any) -> Any:
    """Tune's sampled values as JSON scalars (numpy types become Python ones)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TrialClosedError(RuntimeError):
    """The service ended the trial's run before it could run (cancelled, or past the sweep's budget)."""


class TrialTrainable(Trainable):
    def setup(self, config: dict[Any, Any], context: SearchContext | None = None) -> None:
        assert context is not None, "pass the context with tune.with_parameters"
        self.context = context
        params = {key: _plain(value) for key, value in config.items()}
        registered = context.register(self.trial_id, params)
        self.folder = Path(registered["folder"])
        self.run_id = str(registered["run_id"])
        self.ended_before = registered["status"] in ("succeeded", "failed", "cancelled", "stopped")
        self.epoch, self.value = 0, math.nan
        self.process: subprocess.Popen[bytes] | None = None
        self.attempt = 0
        self.offset = 0  # bytes of train/log.jsonl already read
        self._alive: threading.Thread | None = None
        self._stop_alive = threading.Event()
        self._close_dead_attempt()

    # ------------------------------------------------------------------ Tune's API

    def step(self) -> dict[str, Any]:
        if self.ended_before:  # restored after the service had settled it: nothing more to run
            return self._result(done=True)
        if self.process is None:
            self._start()
        while True:
            epoch_record = self._next_epoch()
            if epoch_record is not None:
                self.epoch = int(epoch_record["epoch"])
                self.value = self._objective(epoch_record)
                self._record(self.epoch, self.value)
                if self.epoch < self.context.epochs:
                    return self._result(done=False)
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                self._ended(code)
                if code != 0:
                    raise RuntimeError(f"trial run {self.run_id} exited {code} (see its attempt-{self.attempt}.log)")
                return self._result(done=True)
            if cancel_path(self.folder, self.attempt).exists():
                self._terminate()
            time.sleep(0.5)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """Tune's checkpoint is only where the trial is in its log; the weights are the run's own checkpoint."""
        state = {"epoch": self.epoch, "value": self.value if math.isfinite(self.value) else None}
        (Path(checkpoint_dir) / "trial.json").write_text(json.dumps({**state, "offset": self.offset}))

    def load_checkpoint(self, checkpoint: Any) -> None:
        state = json.loads((Path(str(checkpoint)) / "trial.json").read_text())
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.value = math.nan if state["value"] is None else float(state["value"])

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self._terminate()
            try:
                code = self.process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
            self._ended(code)

    # ------------------------------------------------------------------ the run

    def _result(self, done: bool) -> dict[str, Any]:
        return {
            TRIAL_METRIC: self.value,
            "epoch": self.epoch,
            "orch_run_id": self.run_id,
            "orch_folder": str(self.folder),
            "done": done,
        }

    def _close_dead_attempt(self) -> None:
        """After a restore, an attempt the dead search left "running" is closed from its result file, so the
        service requeues the trial at once instead of waiting for the attempt to fall silent."""
        number = launched_attempt(self.folder)
        if number is None:
            return
        try:
            record = json.loads(attempt_path(self.folder, number).read_text())
        except (OSError, ValueError):
            return
        if record.get("state") != "running":
            return
        result = read_result(self.folder, number)
        codes = {"completed": 0, "stopped": 0, "failed": 1, "interrupted": 75}
        code = codes.get(result.status) if result is not None else None
        write_attempt(
            self.folder,
            number,
            "ended",
            started_at=record.get("started_at"),
            ended_at=time.time(),
            exit_code=code,
            lost=code is None,
        )

    def _start(self) -> None:
        """Wait for the service to let the next attempt run, then start the job runner on the trial's folder."""
        while True:
            number = launched_attempt(self.folder)
            if number is not None and not attempt_path(self.folder, number).exists():
                break
            if closed_path(self.folder).exists():
                raise TrialClosedError(
                    f"trial run {self.run_id} ended before it ran: {closed_path(self.folder).read_text()}"
                )
            time.sleep(1.0)
        self.attempt = number
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "ORCH_LOCAL_JOB_ID")}
        env.update({"ORCH_JOB_ID": f"{self.run_id}:{number}", "ORCH_RUN_ID": self.run_id, "PYTHONUNBUFFERED": "1"})
        argv = [sys.executable, "-m", "orchestrator.jobs", str(self.folder), "--attempt", str(number)]
        with open(logs / f"attempt-{number}.log", "ab") as out:
            self.process = subprocess.Popen(
                argv, cwd=self.folder, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        self.started_at = time.time()
        write_attempt(self.folder, number, "running", started_at=self.started_at, child=self.process.pid)
        self._stop_alive.clear()
        self._alive = threading.Thread(target=self._keep_alive, daemon=True)
        self._alive.start()

    def _keep_alive(self) -> None:
        while not self._stop_alive.wait(ALIVE_EVERY_S):
            if self.process is not None and self.process.poll() is None:
                write_attempt(self.folder, self.attempt, "running", started_at=self.started_at, child=self.process.pid)

    def _ended(self, code: int) -> None:
        """Record the runner's exit; one stopped just after it had finished (ASHA acts on an epoch while a
        short run completes) exited with the signal but its result file says it completed: that counts."""
        result = read_result(self.folder, self.attempt)
        if code != 0 and result is not None and result.status in ("completed", "stopped"):
            code = 0
        self._stop_alive.set()
        if self._alive is not None:
            self._alive.join(timeout=10)
        write_attempt(
            self.folder, self.attempt, "ended", started_at=self.started_at, ended_at=time.time(), exit_code=code
        )

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits

    def _next_epoch(self) -> dict[str, Any] | None:
        """The next epoch the trainer logged after the last one reported (None if there is none yet)."""
        path = self.folder / "train" / "log.jsonl"
        try:
            with open(path, "rb") as handle:
                handle.seek(self.offset)
                while True:
                    line = handle.readline()
                    if not line.endswith(b"\n"):
                        return None  # nothing more, or a line being written
                    self.offset += len(line)
                    record = json.loads(line)
                    if record.get("event") == "epoch" and int(record.get("epoch", 0)) > self.epoch:
                        return dict(record)
        except (OSError, ValueError):
            return None

    def _objective(self, epoch_record: dict[str, Any]) -> float:
        metric = self.context.metric
        if metric.startswith("train/"):
            return float(epoch_record.get(f"train_{metric.removeprefix('train/')}", math.nan))
        monitor = self.context.monitor
        if monitor is None:
            return math.nan
        from evaluator.benchmarks import get_benchmark

        checkpoint = self._epoch_checkpoint(int(epoch_record["epoch"]))
        if checkpoint is None:
            return math.nan
        result = get_benchmark(str(monitor["benchmark"])).run(checkpoint, str(monitor["dataset"]), monitor["config"])
        return float(result.metrics.get(metric.split("/", 1)[1], math.nan))

    def _epoch_checkpoint(self, epoch: int) -> Path | None:
        """The checkpoint the trainer wrote at the end of `epoch` (its numbered copy when it kept one)."""
        found: Path | None = None
        with contextlib.suppress(OSError, ValueError):
            for line in (self.folder / "train" / "log.jsonl").read_text().splitlines():
                if '"checkpoint"' in line:
                    record = json.loads(line)
                    if record.get("epoch") == epoch and record.get("kind") in ("epoch", "periodic"):
                        found = Path(record["path"])
        return found if found is not None and found.is_file() else None

    def _record(self, epoch: int, value: float) -> None:
        """The objective per epoch: in the trial's folder (the service records it) and in its MLflow run."""
        line = json.dumps({"epoch": epoch, "value": value if math.isfinite(value) else None}) + "\n"
        mailbox(self.folder).mkdir(parents=True, exist_ok=True)
        with open(mailbox(self.folder) / METRICS_FILE, "a") as handle:
            handle.write(line)
        with contextlib.suppress(Exception):  # MLflow is the view; never fatal to the trial
            job = JobFile.read(self.folder)
            if job.mlflow_run_id and math.isfinite(value):
                from mlflow import MlflowClient

                MlflowClient(tracking_uri=job.mlflow_tracking_uri).log_metric(
                    job.mlflow_run_id, self.context.metric, value, step=epoch
                )


class ExplainedASHA(ASHAScheduler):
    """ASHA that says why: before a trial is stopped early, it leaves a stop request in the trial's folder
    naming the rung, the trial's value and the rung's cutoff, so the run ends `stopped` with that reason.

    It also keeps its rungs in `rungs_path` after every result: Tune saves trials and the searcher with the
    experiment but not a scheduler's bookkeeping, so a restored search would otherwise judge the trials left
    against empty rungs, and the first of them to arrive would always go on."""

    def __init__(self, primary: str, rungs_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._primary = primary
        self._max_epochs = int(kwargs["max_t"])
        self._rungs_path = rungs_path
        self._rungs_loaded = False

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_rungs()  # a restore adds its trials again before any of them reports
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        why = self._why(trial, result)
        decision: str = super().on_trial_result(tune_controller, trial, result)
        self._save_rungs()
        epoch = int(result.get("epoch", 0))
        if decision == TrialScheduler.STOP and epoch < self._max_epochs and result.get("orch_folder"):
            request_stop(Path(str(result["orch_folder"])), why)
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save_rungs()

    def _save_rungs(self) -> None:
        if self._rungs_path is None:
            return
        brackets = [
            [[float(milestone), {str(k): float(v) for k, v in recorded.items()}] for milestone, recorded in b._rungs]
            for b in self._brackets
        ]
        atomic_write_text(Path(self._rungs_path), json.dumps({"brackets": brackets, "stopped": self._num_stopped}))

    def _load_rungs(self) -> None:
        """The rungs as the previous search process left them (once per process; none on a first attempt)."""
        if self._rungs_loaded or self._rungs_path is None:
            return
        self._rungs_loaded = True
        try:
            saved = json.loads(Path(self._rungs_path).read_text())
        except (OSError, ValueError):
            return
        for bracket, rungs in zip(self._brackets, saved.get("brackets", []), strict=False):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, rungs, strict=False):
                if float(milestone) == float(saved_milestone):
                    recorded.update({str(k): float(v) for k, v in saved_recorded.items()})
        self._num_stopped = int(saved.get("stopped", 0))

    def _why(self, trial: Any, result: dict[str, Any]) -> str:
        epoch, value = int(result.get("epoch", 0)), float(result.get(TRIAL_METRIC, math.nan))
        text = f"stopped early by ASHA after epoch {epoch} of {self._max_epochs}: {self._primary} = {value:.4g}"
        try:  # the rung this result reaches and its cutoff (ASHA's own bookkeeping)
            bracket = self._trial_info[trial.trial_id]
            for milestone, recorded in bracket._rungs:
                if epoch >= milestone and trial.trial_id not in recorded:
                    cutoff = bracket.cutoff(recorded)
                    if cutoff is not None:
                        text += (
                            f", worse than the cutoff {self._metric_op * cutoff:.4g} of the rung at epoch "
                            f"{milestone:g} (only the best 1/{bracket.rf:g} of the trials that reached it go on; "
                            f"{len(recorded)} had)"
                        )
                    break
        except (AttributeError, KeyError, TypeError):
            pass
        return text
