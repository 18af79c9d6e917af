"""The `orchestrator` CLI as users run it (a real process against a live service)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from orchestrator.embedded import EmbeddedService
from tests.conftest import REPO
from tests.orch_support import ADMIN, free_port, make_settings
from tests.test_orch_local import MICRO

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


def test_submit_follow_runs_to_success_and_ckpt_export(service: EmbeddedService, tmp_path: Path) -> None:
    done = cli("submit", "tiny_cpu", *MICRO, "--launcher", "local", "--follow", service=service, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "succeeded" in done.stderr and "checkpoint epoch" in done.stderr
    run_id = done.stdout.split()[1]
    show = json.loads(cli("runs", "show", run_id, "--output", "json", service=service).stdout)
    checkpoint = Path(show["output_dir"]) / "checkpoint.pth"
    exported = cli("ckpt", "export", str(checkpoint), str(tmp_path / "exp"), "--output", "json")
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads(exported.stdout)
    assert set(manifest["files"]) == {"torch", "safetensors", "mm", "dino", "aggregation"}
    weights = torch.load(tmp_path / "exp" / "backbone.pth", weights_only=True)
    assert "cls_token" not in weights and "pos_embed" in weights  # the SelfPatch backbone has no [CLS]
    logs = cli("runs", "logs", run_id, "--tail", "5", service=service)
    assert logs.returncode == 0 and logs.stdout.strip()
