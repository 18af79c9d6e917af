"""Schemathesis against the live service on each database: every check (server errors, status codes,
content types, headers, response schemas, positive and negative data, auth, methods), examples, coverage,
fuzzing and stateful sequences, with the admin token. Any failure fails the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, free_port, wait_for

pytestmark = pytest.mark.slow  # a live service and a few thousand generated requests per database
CONFIG = Path(__file__).with_name("schemathesis.toml")
TOKEN = "fuzz-admin-token"


def test_schemathesis_finds_no_failure_on_the_live_service(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ORCH_")},
        "ORCH_HOME": str(tmp_path / "home"),
        "ORCH_DATABASE_URL": db_url,
        "ORCH_ADMIN_TOKENS": f"admin:{TOKEN}",
        "ORCH_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "ORCH_DEFAULT_LAUNCHER": "dryrun",
    }
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "orchestrator"), "serve", "--port", str(port), "--no-reconciler", "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, "the service to be ready")
        report = tmp_path / "schemathesis.json"
        command = [
            str(bin_dir / "schemathesis"),
            "--config-file",
            str(CONFIG),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--max-examples",
            "40",
            "--seed",
            "20261201",
            "--no-color",
            "--report",
            "json",
            "--report-json-path",
            str(report),
        ]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        summary = json.loads(report.read_text())
        cases = summary["test_cases"]
        assert done.returncode == 0 and not summary["failures"] and not summary["errors"], done.stdout[-6000:]
        assert cases["generated"] >= 1000 and cases["errored"] == 0, cases
        print(f"schemathesis on {db_url.split(':')[0]}: {cases['generated']} generated cases, 0 failures")
    finally:
        server.terminate()
        server.wait(timeout=30)
