"""Run a command, forward termination signals to it, and record its exit code in a file.

The local launcher starts jobs through this wrapper in their own session, so they outlive a service
restart and their exit status survives for the service to read when it comes back.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from trainer.files import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.launchers.supervise")
    parser.add_argument("--exit-file", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    code = child.wait()
    record = {"exit_code": code, "ended_at": time.time()}
    atomic_write_text(args.exit_file, json.dumps(record))
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
