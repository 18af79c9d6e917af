"""Job-side reports to the service (start, heartbeat, checkpoint, end), sent from a background thread.

Training and evaluation never wait on the network: reports are queued, retried with backoff, and whatever
cannot be delivered is also in the job's durable files (the trainer's log.jsonl, the result file), which
the reconciler reads.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from typing import Any

import httpx

from orchestrator.jobs.files import JobFile

log = logging.getLogger("orchestrator.jobs")


def scheduler_job_id() -> str | None:
    env = os.environ  # Ray strips RAY_JOB_ID from jobs: its launcher passes the submission id as ORCH_JOB_ID
    return env.get("SLURM_JOB_ID") or env.get("ORCH_JOB_ID") or env.get("ORCH_LOCAL_JOB_ID")


class Reporter:
    def __init__(self, job: JobFile, attempt: int, heartbeat_s: float = 15.0) -> None:
        self.url = job.report_url
        self.headers = {"Authorization": f"Bearer {job.token}"}
        self.attempt, self.heartbeat_s = attempt, heartbeat_s
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._last_beat = 0.0
        self._thread = threading.Thread(target=self._deliver, name="orch-reporter", daemon=True)
        self._thread.start()

    def send(self, kind: str, **data: Any) -> None:
        self._queue.put({"kind": kind, "attempt": self.attempt, "at": time.time(), **data})

    def start(self, **info: Any) -> None:
        self.send("start", host=socket.gethostname(), pid=os.getpid(), job_id=scheduler_job_id(), **info)

    def heartbeat(self, **data: Any) -> None:
        """At most one heartbeat per `heartbeat_s`, however often it is called."""
        now = time.time()
        if now - self._last_beat >= self.heartbeat_s:
            self._last_beat = now
            self.send("heartbeat", **data)

    def _deliver(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            while (report := self._queue.get()) is not None:
                delay = 0.5
                for _ in range(8):
                    try:
                        response = client.post(self.url, json=report, headers=self.headers)
                        if response.status_code < 500:
                            if response.status_code >= 400:
                                log.warning("report %s refused: %s", report["kind"], response.text[:200])
                            break
                    except httpx.HTTPError as exc:
                        log.debug("report %s failed: %s", report["kind"], exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def beat_every(self, every_s: float) -> threading.Event:
        """Heartbeats from a background thread until the returned event is set (jobs with no progress of
        their own to report, such as a benchmark or a Tune driver)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every_s):
                self.send("heartbeat")

        threading.Thread(target=beat, name="orch-heartbeat", daemon=True).start()
        return stop

    def finish(self, stop: threading.Event, code: int) -> int:
        """End the job's reporting (and its SIGTERM handler) and return its exit code."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop.set()
        self.close()
        return code


def quiet_http_logs() -> None:
    """Keep the job's log about the job: httpx logs every request at INFO."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
