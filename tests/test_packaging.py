"""The project as the Docker image installs it: a wheel (not the source tree) in a fresh virtual environment,
run from a folder outside the repository, serves the API and resolves the presets it ships."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, free_port, install_wheel, wait_for

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment


def test_a_wheel_in_a_fresh_venv_serves_a_preset_dry_run(tmp_path: Path) -> None:
    installed = install_wheel(tmp_path / "image")
    env_dir, python, fresh_site = installed.env_dir, installed.python, installed.site_packages
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the venv itself finds
    where = subprocess.run(
        [str(python), "-c", "import trainer, api, orchestrator; print(trainer.__file__, api.__file__)"],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert str(REPO) not in where.stdout and str(fresh_site) in where.stdout, where.stdout

    port = free_port()
    token = "wheel-admin-token"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "PYTHONPATH"))},
        "ORCH_HOME": str(tmp_path / "home"),
        "ORCH_ADMIN_TOKENS": f"admin:{token}",
        "ORCH_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    server = subprocess.Popen(
        [str(env_dir / "bin" / "orchestrator"), "serve", "--port", str(port), "--no-reconciler"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, "the installed service to be ready")
        reply = httpx.post(
            f"{url}/api/v1/runs?dry_run=true",
            json={"preset": "tiny_cpu", "launcher": "local"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        dry = reply.json()
        assert dry["config"]["model"]["arch"] == "vit_tiny" and len(dry["config_hash"]) == 64
        assert f"{env_dir / 'bin' / 'python'} -m orchestrator.jobs" in dry["rendered"]  # jobs run the installed copy
        runs = httpx.get(f"{url}/api/v1/runs", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        assert runs["items"] == []  # a dry run writes nothing
        login = httpx.get(f"{url}/login", timeout=30)  # the UI's templates and static files ship in the wheel
        assert login.status_code == 200 and 'name="token"' in login.text
        for asset in ("/static/ui.css", "/static/ui.js", "/static/vendor/htmx-2.0.11.min.js"):
            assert httpx.get(f"{url}{asset}", timeout=30).status_code == 200, asset
    finally:
        server.terminate()
        server.wait(timeout=30)
