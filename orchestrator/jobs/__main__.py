"""`python -m orchestrator.jobs FOLDER [--attempt N]`: what every launcher starts, for every kind of job.

Reads FOLDER/job.json, runs the runner of its kind (train, evaluate) for this attempt and exits with the
job exit codes: 0 completed, 1 failed, 2 bad job file, 75 interrupted (checkpointed: requeue to resume).
The attempt is the launcher's number shifted by SLURM's own restarts of the same job.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from orchestrator.jobs.files import EXIT_BAD_JOB, JobFile, write_result
from orchestrator.jobs.kinds import KINDS
from orchestrator.jobs.reporter import quiet_http_logs


def attempt_number(explicit: int | None) -> int:
    """The attempt given by the launcher, shifted by SLURM's own requeues of the same job."""
    return (explicit or 1) + int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def run(folder: Path, attempt: int | None = None) -> int:
    folder = Path(folder).resolve()
    number = attempt_number(attempt)
    try:
        job = JobFile.read(folder)
        runner = KINDS[job.kind].runner
    except (OSError, ValueError, TypeError, KeyError) as exc:
        write_result(folder, number, "failed", reason=f"bad job file: {exc}")
        return EXIT_BAD_JOB
    module_name, _, function = runner.partition(":")
    code: int = getattr(importlib.import_module(module_name), function)(job, folder, number)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.jobs", description=__doc__)
    parser.add_argument("folder", type=Path, help="the job's folder holding job.json")
    parser.add_argument("--attempt", type=int, default=None, help="attempt number (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_http_logs()
    return run(args.folder, args.attempt)


if __name__ == "__main__":
    sys.exit(main())
