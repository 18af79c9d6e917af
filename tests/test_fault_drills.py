"""Fault drills: the service killed with SIGKILL at seeded random moments during a burst of submits and
during runs, a disk that fills up while a checkpoint is written, PostgreSQL restarted under load. Nothing
acknowledged may be lost, nothing may be recorded twice, no run may succeed that did not finish."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.support import MICRO, Service, auth, get, wait_for
from trainer.checkpoint import load_checkpoint
from trainer.files import NUMBERED, sha256_file

pytestmark = pytest.mark.slow  # real services and jobs, killed and restarted
SEED = 20261201


def submit_until_acknowledged(url: str, key: str, body: dict[str, Any], deadline: float) -> str:
    """What a careful client does: the same Idempotency-Key again until the service answers 202."""
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.post(
                f"{url}/api/v1/runs", json=body, headers={**auth(), "Idempotency-Key": key}, timeout=10
            )
            if response.status_code == 202:
                return str(response.json()["id"])
            assert response.status_code in (502, 503), response.text  # only "retry later" answers
        time.sleep(0.2)
    raise AssertionError(f"submission {key} was never acknowledged")


def burst(url: str, keys: list[str], body: dict[str, Any], acknowledged: dict[str, str]) -> threading.Thread:
    def work() -> None:
        deadline = time.monotonic() + 300
        for key in keys:
            acknowledged[key] = submit_until_acknowledged(url, key, body, deadline)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}", ORCH_LOCAL_MAX_CONCURRENT="2")
    svc.start()
    yield svc
    svc.stop()


def test_kill_9_during_submits_and_runs_loses_nothing_acknowledged(service: Service) -> None:
    rng = random.Random(SEED)
    body = {"experiment": "drill", "preset": "tiny_cpu", "overrides": MICRO, "launcher": "local"}
    keys = [f"drill-{i}" for i in range(6)]
    acknowledged: dict[str, str] = {}
    submitter = burst(service.url, keys, body, acknowledged)
    while submitter.is_alive() and service.kills < 3:  # during the burst
        time.sleep(rng.uniform(0.05, 0.6))
        service.kill()
        service.start()
    submitter.join(timeout=300)
    assert sorted(acknowledged) == keys
    for _ in range(2):  # during the runs (their jobs live on, detached from the service)
        time.sleep(rng.uniform(2.0, 8.0))
        service.kill()
        service.start()
    assert service.kills >= 5

    ids = set(acknowledged.values())
    finals = wait_for(
        lambda: (
            (runs := [get(service.url, f"/runs/{i}") for i in ids])
            and all(r["status"] in ("succeeded", "failed", "cancelled") for r in runs)
            and runs
        ),
        600,
        "every acknowledged run to end",
    )
    listed = get(service.url, "/runs?page_size=100&experiment=drill")["items"]
    assert {r["id"] for r in listed} == ids and len(listed) == len(keys)  # exactly one run per key
    for run in finals:
        assert run["status"] == "succeeded", (run["id"], run["status_reason"])
        assert [a["number"] for a in run["attempts"]] == [1], run["attempts"]  # no duplicate attempt
        on_disk = {
            str(p): sha256_file(p) for p in Path(run["output_dir"]).glob("checkpoint*.pth") if NUMBERED.search(p.name)
        }
        recorded = [(c["path"], c["sha256"]) for c in get(service.url, f"/runs/{run['id']}/checkpoints")]
        numbered = [(path, sha) for path, sha in recorded if NUMBERED.search(path)]
        assert sorted(numbered) == sorted(on_disk.items()), run["id"]  # each file on disk recorded exactly once


def test_a_full_disk_during_a_checkpoint_fails_the_run_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """The run folders live on a 3.3 MB tmpfs: two micro checkpoints fit, the third write runs out of space."""
    home = tmp_path / "home"
    runs = home / "runs"
    runs.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3300k", "tmpfs", str(runs)], capture_output=True)
    assert mounted.returncode == 0, f"the drill mounts a tmpfs (make test runs as root): {mounted.stderr!r}"
    svc = Service(home, f"sqlite:///{tmp_path / 'orch.db'}")
    try:
        svc.start()
        body = {
            "experiment": "disk",
            "preset": "tiny_cpu",
            "overrides": [*MICRO, "optim.epochs=6"],
            "launcher": "local",
        }
        run_id = submit_until_acknowledged(svc.url, "disk-1", body, time.monotonic() + 60)
        final = wait_for(
            lambda: (run := get(svc.url, f"/runs/{run_id}"))["status"] in ("succeeded", "failed") and run,
            600,
            "the run on the full disk to end",
        )
        assert final["status"] == "failed" and "no space left on device" in final["status_reason"].lower(), final
        train = Path(final["output_dir"])
        latest = train / "checkpoint.pth"
        state = load_checkpoint(latest)  # the last checkpoint written before the disk filled is intact
        recorded = {c["sha256"] for c in get(svc.url, f"/runs/{run_id}/checkpoints")}
        assert sha256_file(latest) in recorded and 0 < int(state["iteration"]) < 6 * 8
        assert not list(train.glob(".*.tmp"))  # the failed write left no partial file behind
    finally:
        svc.stop()
        subprocess.run(["umount", "-l", str(runs)], check=False)


@pytest.mark.services
def test_postgresql_restarted_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    from tests.conftest import PG_ADMIN_URL

    name = f"orch_drill_{os.getpid()}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    svc = Service(tmp_path / "home", PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", ORCH_DEFAULT_LAUNCHER="dryrun")
    try:
        svc.start()
        body = {"experiment": "pg-drill", "preset": "tiny_cpu", "launcher": "dryrun"}
        keys = [f"pg-{i}" for i in range(40)]
        acknowledged: dict[str, str] = {}
        submitter = burst(svc.url, keys, body, acknowledged)
        time.sleep(1.0)
        version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
        restart = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"]
        subprocess.run(restart, check=True, capture_output=True, timeout=120)
        submitter.join(timeout=300)
        assert sorted(acknowledged) == sorted(keys)
        wait_for(svc.ready, 60, "the service to answer again")
        listed = get(svc.url, "/runs?page_size=100&experiment=pg-drill")["items"]
        assert {r["id"] for r in listed} == set(acknowledged.values()) and len(listed) == len(keys)
    finally:
        svc.stop()
        admin.dispose()  # its pooled connection died with the restart
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
