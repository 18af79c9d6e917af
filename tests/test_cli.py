"""The `orchestrator` CLI as users run it (a real process against a live service)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from api.shell.embedded import EmbeddedService
from tests.support import ADMIN, MICRO, REPO, free_port, make_settings

CLI = str(Path(sys.executable).parent / "orchestrator")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[EmbeddedService]:
    settings = make_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}")
    with EmbeddedService(settings, port=free_port()) as svc:
        yield svc


def cli(*args: str, service: EmbeddedService | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    extra = ["--url", service.url, "--token", ADMIN] if service else []
    return subprocess.run([CLI, *args, *extra], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_help_explains_the_commands() -> None:
    out = cli("--help").stdout
    for command in ("serve", "scheduler", "submit", "runs", "ckpt", "demo"):
        assert command in out
    submit_help = cli("submit", "--help").stdout
    assert "--dry-run" in submit_help and "--follow" in submit_help and "--output" in submit_help


def test_submit_list_show_cancel_as_json(service: EmbeddedService) -> None:
    done = cli("submit", "tiny_cpu", "optim.epochs=1", "--launcher", "dryrun", "--output", "json", service=service)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] in ("queued", "submitted") and run["launcher"] == "dryrun"
    listed = json.loads(cli("runs", "list", "--output", "json", service=service).stdout)
    assert [r["id"] for r in listed["items"]] == [run["id"]]
    shown = cli("runs", "show", run["id"], service=service)
    assert shown.returncode == 0 and run["id"] in shown.stdout and "config hash" in shown.stdout
    assert (
        json.loads(cli("runs", "cancel", run["id"], "--output", "json", service=service).stdout)["status"]
        == "cancelled"
    )
    again = cli("runs", "cancel", run["id"], service=service)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "HTTP 409" in again.stderr


def test_dry_run_prints_the_submission_and_changes_nothing(service: EmbeddedService) -> None:
    dry = cli(
        "submit", "tiny_cpu", "--launcher", "slurm", "--gpus", "2", "--partition", "debug", "--dry-run", service=service
    )
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH" in dry.stdout and "config_hash" in dry.stdout
    assert json.loads(cli("runs", "list", "--output", "json", service=service).stdout)["items"] == []


def test_bad_input_exits_nonzero_with_one_line(service: EmbeddedService, tmp_path: Path) -> None:
    bad = cli("submit", "tiny_cpu", "selfpatch.k=99", "--launcher", "dryrun", service=service)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "selfpatch.k" in bad.stderr
    unreachable = subprocess.run(
        [CLI, "runs", "list", "--url", "http://127.0.0.1:9", "--token", "x"], capture_output=True, text=True, timeout=60
    )
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
    corrupt = tmp_path / "bad.pth"
    corrupt.write_bytes(b"not a checkpoint")
    export = cli("ckpt", "export", str(corrupt), str(tmp_path / "out"))
    assert export.returncode == 2 and export.stderr.count("\n") == 1 and "corrupt" in export.stderr


@pytest.mark.slow
def test_submit_follow_runs_to_success_and_ckpt_export(service: EmbeddedService, tmp_path: Path) -> None:
    done = cli("submit", "tiny_cpu", *MICRO, "--launcher", "local", "--follow", service=service, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "succeeded" in done.stderr and re.search(r"checkpoint [0-9a-f-]{36}  epoch +2", done.stderr)
    run_id = done.stdout.split()[1]
    show = json.loads(cli("runs", "show", run_id, "--output", "json", service=service).stdout)
    shown = cli("runs", "show", run_id, service=service).stdout
    assert all(c["id"] in shown for c in show["checkpoints"]) and show["checkpoints"]  # what `evals run` takes
    checkpoint = Path(show["output_dir"]) / "checkpoint.pth"
    exported = cli("ckpt", "export", str(checkpoint), str(tmp_path / "exp"), "--output", "json")
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads(exported.stdout)
    assert set(manifest["files"]) == {"torch", "safetensors", "mm", "dino", "aggregation"}
    weights = torch.load(tmp_path / "exp" / "backbone.pth", weights_only=True)
    assert "cls_token" not in weights and "pos_embed" in weights  # the SelfPatch backbone has no [CLS]
    logs = cli("runs", "logs", run_id, "--tail", "5", service=service)
    assert logs.returncode == 0 and logs.stdout.strip()


def test_the_token_is_found_from_any_directory_and_a_missing_one_is_explained(tmp_path: Path) -> None:
    """ORCH_TOKEN, then $ORCH_HOME/admin.token, then the default home; a 401 says which token was tried."""
    import os

    home = tmp_path / "svc-home"
    settings = make_settings(home, f"sqlite:///{tmp_path / 'orch.db'}").model_copy(
        update={"admin_tokens": "", "read_tokens": ""}
    )
    with EmbeddedService(settings, port=free_port(), reconciler=False) as service:  # writes home/admin.token
        env = {**os.environ, "ORCH_URL": service.url, "HOME": str(tmp_path / "user")}
        env.pop("ORCH_TOKEN", None)
        env.pop("ORCH_HOME", None)

        def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [CLI, *args], cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=120
            )

        found = run("runs", "list", ORCH_HOME=str(home))
        assert found.returncode == 0, found.stderr
        missing = run("runs", "list")
        assert missing.returncode == 1 and missing.stderr.count("\n") == 1
        assert "HTTP 401" in missing.stderr and "admin.token (missing)" in missing.stderr
        assert str(tmp_path / "user" / ".orchestrator" / "admin.token") in missing.stderr
        wrong = run("runs", "list", ORCH_TOKEN="not-the-token")
        assert wrong.returncode == 1 and "--token / $ORCH_TOKEN" in wrong.stderr
        (tmp_path / "user" / ".orchestrator").mkdir(parents=True)
        (tmp_path / "user" / ".orchestrator" / "admin.token").write_text((home / "admin.token").read_text())
        assert run("runs", "list").returncode == 0  # the default home, from any directory
    down = run("runs", "list", ORCH_URL="http://127.0.0.1:9")
    assert down.returncode == 1 and "orchestrator serve" in down.stderr and "HTTP 0" not in down.stderr
