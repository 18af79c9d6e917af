"""The trust boundary, finding by finding: hostile request bodies, queries and paths, forged job reports,
and who may call what. Each input is refused with a 4xx naming the field, and nothing is written."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.contract import ROUTES
from api.main import create_app
from orchestrator.db.models import Checkpoint, Event, Experiment, Run
from orchestrator.db.session import Database
from orchestrator.jobs.fake import FakeLauncher
from orchestrator.jobs.files import job_token
from orchestrator.launchers import Launchers
from orchestrator.launchers.base import JobSpec, LauncherError, Resources
from orchestrator.launchers.slurm import SlurmLauncher
from orchestrator.reconciler import Reconciler
from tests.support import ADMIN, READER, auth, make_settings

TINY = {"preset": "tiny_cpu", "overrides": ["optim.epochs=1"], "launcher": "dryrun"}


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Any:
    return make_settings(tmp_path / "home", db_url)


@pytest.fixture
def client(settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def rows(settings: Any, model: Any) -> int:
    db = Database(settings.db_url)
    try:
        with db.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)
    finally:
        db.dispose()


def refused(response: Any, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    if field is not None:
        assert response.json()["errors"][0]["field"] == field, response.json()


# ------------------------------------------------------------------------------------------- submissions


@pytest.mark.parametrize("key", ["partition", "account", "qos"])
def test_scheduler_names_cannot_carry_a_shell_line(client: TestClient, settings: Any, key: str) -> None:
    body = {**TINY, "resources": {key: "gpu\ntouch /tmp/pwned #"}}
    refused(client.post("/api/v1/runs", json=body, headers=auth()), 422, f"resources.{key}")
    refused(client.post("/api/v1/runs?dry_run=true", json=body, headers=auth()), 422, f"resources.{key}")
    assert rows(settings, Run) == 0


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"comment": "ok\nrm -rf /"}, "resources.extra.comment"),
        ({"constraint": "a100'; touch /x; '"}, "resources.extra.constraint"),
        ({"mail_user": "root@host\n#SBATCH --uid=0"}, "resources.extra.mail_user"),
        ({"wrap": "id"}, "resources.extra"),
    ],
)
def test_extra_sbatch_options_are_a_whitelist_of_grammars(
    client: TestClient, extra: dict[str, str], field: str
) -> None:
    refused(client.post("/api/v1/runs", json={**TINY, "resources": {"extra": extra}}, headers=auth()), 422, field)


def test_the_launcher_refuses_what_validation_was_skipped_for(tmp_path: Path) -> None:
    sneaky = Resources.model_construct(**{**Resources().model_dump(), "partition": "gpu\ntouch /tmp/pwned #"})
    spec = JobSpec("r1", 1, "n", ["python", "-m", "orchestrator.jobs", str(tmp_path)], tmp_path, sneaky)
    with pytest.raises(LauncherError, match="control character"):
        SlurmLauncher(tmp_path).render(spec)
    clean = JobSpec("r1", 1, "n", ["python"], tmp_path, Resources(partition="gpu", extra={"comment": "ablation k=4"}))
    script = SlurmLauncher(tmp_path).render(clean)
    assert all(line.startswith(("#", "export", "srun", "cd", " ")) or not line for line in script.splitlines()[1:])


@pytest.mark.parametrize(
    "preset",
    ["/etc/passwd", "../configs/tiny_cpu", "tiny_cpu.yaml", "/proc/self/environ", "x" * 300, "tiny_cpu\x00"],
)
def test_presets_are_names_from_the_registry_never_paths(client: TestClient, settings: Any, preset: str) -> None:
    response = client.post("/api/v1/runs", json={**TINY, "preset": preset}, headers=auth())
    refused(response, 422, "preset")
    assert "root:" not in response.text and "PATH=" not in response.text  # nothing of any file comes back
    assert rows(settings, Run) == 0


def test_a_preset_cannot_chain_to_a_file_outside_the_registry(tmp_path: Path) -> None:
    from trainer.presets import ConfigError, read_yaml

    sneaky = tmp_path / "x.yaml"
    for base in ("/etc/shadow", "../../etc/passwd", "/proc/self/environ"):
        sneaky.write_text(f"_base_: {base}\n")
        with pytest.raises(ConfigError, match="_base_ must name a preset"):
            read_yaml(sneaky)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.epochs=1e12", "optim.epochs"),
        ("head.out_dim=1000000000000", "head.out_dim"),
        ("model.embed_dim=1000000000", "model.embed_dim"),
        ("data.num_workers=100000", "data.num_workers"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("seed=" + "9" * 5000, "overrides.0"),
        ("seed=" + "[" * 5000 + "]" * 5000, "overrides.0"),
        ("logging.tags={a: " + "x" * 1990 + "}", "overrides.0"),
        ("logging.tags={" + ", ".join(f"k{i}: v" for i in range(150)) + "}", "logging.tags"),
        ("seed=true", "seed"),
    ],
)
def test_configs_the_trainer_cannot_run_are_refused(
    client: TestClient, settings: Any, override: str, field: str
) -> None:
    response = client.post("/api/v1/runs", json={**TINY, "overrides": [override]}, headers=auth())
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] in (field, "overrides"), response.json()
    assert rows(settings, Run) == 0


def test_bodies_are_capped_before_they_are_parsed(client: TestClient, settings: Any) -> None:
    huge = {**TINY, "overrides": ["logging.run_name=" + "x" * 200] * 60_000}  # about 13 MB
    refused(client.post("/api/v1/runs", json=huge, headers=auth()), 413)
    many = {**TINY, "overrides": ["seed=1"] * 1000}
    refused(client.post("/api/v1/runs", json=many, headers=auth()), 422, "overrides")
    assert rows(settings, Run) == 0


@pytest.mark.parametrize("name", ["../etc", "/abs", "a//b", "a/../b", "a/", "a\nb", "a\x00b", "x" * 201])
def test_experiment_names_are_path_like_segments(client: TestClient, settings: Any, name: str) -> None:
    refused(client.post("/api/v1/experiments", json={"name": name}, headers=auth()), 422, "name")
    refused(client.post("/api/v1/runs", json={**TINY, "experiment": name}, headers=auth()), 422, "experiment")
    assert rows(settings, Experiment) == 0


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/api/v1/runs", {**TINY, "name": "a\x00b"}),
        ("/api/v1/experiments", {"name": "ok", "description": "nul \x00 inside"}),
    ],
)
def test_nul_characters_are_refused_on_both_databases(client: TestClient, path: str, payload: dict[str, Any]) -> None:
    assert client.post(path, json=payload, headers=auth()).status_code == 422


@pytest.mark.parametrize(
    "token",
    [
        "MjAyNi0xMi0wMVQwMDowMDowMA",  # base64 of a naive datetime
        "WyIyMDI2LTEyLTAxVDAwOjAwOjAwIiwgIjEiXQ",  # naive datetime and an id
        "٣٣٣",  # non-ASCII digits
        "9" * 5000,
        str(2**64),
        "W1sxXSwgMl0",  # [[1], 2]
        "%00",
    ],
)
def test_malformed_page_tokens_are_422_on_every_list(client: TestClient, token: str) -> None:
    run = client.post("/api/v1/runs", json=TINY, headers=auth()).json()
    for path in ("/api/v1/runs", "/api/v1/experiments", "/api/v1/evaluations", f"/api/v1/runs/{run['id']}/events"):
        response = client.get(path, params={"page_token": token}, headers=auth())
        refused(response, 422, "page_token")


def test_nul_and_junk_in_queries_and_paths_are_4xx(client: TestClient) -> None:
    assert client.get("/api/v1/runs", params={"experiment": "a\x00b"}, headers=auth()).status_code == 422
    assert client.get("/api/v1/runs", params={"experiment": "nope"}, headers=auth()).json()["items"] == []
    assert client.get("/api/v1/evaluations", params={"benchmark": "a\x00"}, headers=auth()).status_code == 422
    for path in ("/api/v1/runs/%00", "/api/v1/experiments/a%00b", "/api/v1/evaluations/..%2F..%2Fetc"):
        assert client.get(path, headers=auth()).status_code == 404


# ------------------------------------------------------------------------------------------- job reports


@pytest.fixture
def running(client: TestClient, settings: Any) -> Iterator[tuple[dict[str, Any], str, FakeLauncher]]:
    """A run whose job runs on a fake scheduler, its report URL's token, and that scheduler."""
    state = client.app.state.orch  # type: ignore[attr-defined]
    fake = FakeLauncher()
    state.launchers = Launchers(settings, fixed={"local": fake})
    run = client.post("/api/v1/runs", json={**TINY, "launcher": "local"}, headers=auth()).json()
    Reconciler(settings, state.db, state.launchers).reconcile_once()
    yield run, job_token(settings.secret, run["id"]), fake


def report(client: TestClient, run: dict[str, Any], token: str, **body: Any) -> Any:
    return client.post(f"/api/v1/runs/{run['id']}/reports", json={"attempt": 1, **body}, headers=auth(token))


def test_reports_are_bounded_in_every_field(client: TestClient, settings: Any, running: Any) -> None:
    run, token, _ = running
    for body, field in (
        ({"kind": "x" * 100}, "kind"),
        ({"kind": "start", "attempt": 99}, "attempt"),
        ({"kind": "start", "attempt": 2**40}, "attempt"),
        ({"kind": "start", "job_id": "../../../../etc/x"}, "job_id"),
        ({"kind": "start", "host": "h" * 300}, "host"),
        ({"kind": "heartbeat", "iteration": 2**70}, "iteration"),
        ({"kind": "heartbeat", "metrics": {"train/loss": float("nan")}}, "metrics.train/loss"),
        ({"kind": "heartbeat", "metrics": {"train/loss": float("inf")}}, "metrics.train/loss"),
        ({"kind": "end", "reason": "a\x00b"}, "reason"),
    ):
        payload = {"attempt": 1, **body}
        response = client.post(
            f"/api/v1/runs/{run['id']}/reports",
            content=json.dumps(payload, allow_nan=True),
            headers={**auth(token), "Content-Type": "application/json"},
        )
        refused(response, 422, field)
    events = rows(settings, Event)
    assert events == 3  # queued, the attempt, submitted: no report wrote anything


def test_checkpoint_reports_are_confined_to_the_runs_folder(
    client: TestClient, settings: Any, running: Any, tmp_path: Path
) -> None:
    run, token, _ = running
    passwd = report(client, run, token, kind="checkpoint", path="/etc/passwd", epoch=1, iteration=1, sha256="0" * 64)
    refused(passwd, 422, "path")
    outside = tmp_path / "elsewhere.pth"
    outside.write_bytes(b"x")
    link = Path(run["output_dir"]) / "checkpoint0000.pth"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    sha = hashlib.sha256(b"x").hexdigest()
    refused(
        report(client, run, token, kind="checkpoint", path=str(link), epoch=1, iteration=1, sha256=sha), 422, "path"
    )
    real = Path(run["output_dir"]) / "checkpoint0001.pth"
    real.write_bytes(b"weights")
    wrong = report(client, run, token, kind="checkpoint", path=str(real), epoch=1, iteration=1, sha256="0" * 64)
    refused(wrong, 422, "sha256")
    assert rows(settings, Checkpoint) == 0
    good = hashlib.sha256(b"weights").hexdigest()
    assert (
        report(client, run, token, kind="checkpoint", path=str(real), epoch=2, iteration=2, sha256=good).status_code
        == 204
    )
    assert rows(settings, Checkpoint) == 1


def test_a_job_cannot_point_its_attempt_at_another_runs_job(client: TestClient, settings: Any, running: Any) -> None:
    run_a, token_a, fake = running
    run_b = client.post("/api/v1/runs", json={**TINY, "launcher": "local"}, headers=auth()).json()
    Reconciler(settings, client.app.state.orch.db, client.app.state.orch.launchers).reconcile_once()  # type: ignore[attr-defined]
    job_b = fake.job_of(run_b["id"])
    forged = report(client, run_a, token_a, kind="start", host="n1", job_id=job_b)
    refused(forged, 409, "job_id")
    events = client.get(f"/api/v1/runs/{run_a['id']}/events", headers=auth()).json()["items"]
    assert [e["kind"] for e in events][-1] == "report_refused" and job_b in events[-1]["reason"]
    attempt_a = client.get(f"/api/v1/runs/{run_a['id']}", headers=auth()).json()["attempts"][0]
    assert attempt_a["backend_job_id"] == fake.job_of(run_a["id"]) != job_b
    assert client.post(f"/api/v1/runs/{run_a['id']}/cancel", headers=auth()).status_code == 200
    assert fake.cancelled == [fake.job_of(run_a["id"])]  # B's job is untouched
    assert client.get(f"/api/v1/runs/{run_b['id']}", headers=auth()).json()["status"] == "submitted"


# ------------------------------------------------------------------------------------------- who may call what


def _concrete(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)


def test_every_route_answers_401_and_403_as_the_role_table_says(client: TestClient, settings: Any) -> None:
    """Walks the OpenAPI: no token, an unknown token, a read token on admin routes, another job's token on
    job routes. The role of every route comes from one table (api.contract.ROUTES)."""
    run = client.post("/api/v1/runs", json=TINY, headers=auth()).json()
    ids = {
        "run_id": run["id"],
        "evaluation_id": str(uuid.uuid4()),
        "checkpoint_id": str(uuid.uuid4()),
        "experiment": "default",
        "sweep": "no-such-sweep",
        "search_id": str(uuid.uuid4()),
        "name": "metric.png",
    }
    spec = client.get("/openapi.json").json()
    walked = 0
    for path, operations in spec["paths"].items():
        for method in operations:
            role = ROUTES[f"{method.upper()} {path}"]
            url = _concrete(path, ids)
            body = {} if method in ("post", "patch") else None

            def send(headers: dict[str, str], method: str = method, url: str = url, body: Any = body) -> Any:
                return client.request(method.upper(), url, json=body, headers=headers)

            if role == "open":
                assert send({}).status_code == 200, (method, path)
                continue
            walked += 1
            for headers in ({}, auth("not-a-token"), {"Authorization": "Basic abc"}):
                refused(send(headers), 401)
            if role == "admin":
                refused(send(auth(READER)), 403)
            if role == "job":
                other = job_token(settings.secret, uuid.uuid4())
                refused(send(auth(other)), 401)
                refused(send(auth(ADMIN)), 401)  # an admin token is not a job's token
    assert walked == sum(role != "open" for role in ROUTES.values())
