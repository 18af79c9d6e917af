"""The REST API on SQLite and on the real PostgreSQL server: auth, validation, idempotency, pagination,
lifecycle actions, job reports and the OpenAPI document."""

from __future__ import annotations

import concurrent.futures
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from api.shell.embedded import EmbeddedService
from orchestrator.db.models import Event, IdempotencyRecord, Run
from orchestrator.db.session import Database
from orchestrator.jobs.files import job_token
from orchestrator.reconciler import Reconciler
from tests.support import ADMIN, READER, auth, free_port, make_settings

TINY = {"preset": "tiny_cpu", "overrides": ["optim.epochs=1"], "launcher": "dryrun"}


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Any:
    return make_settings(tmp_path / "home", db_url)


@pytest.fixture
def client(settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def count_rows(settings: Any, model: Any) -> int:
    db = Database(settings.db_url)
    try:
        with db.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)
    finally:
        db.dispose()


def test_health_is_open_and_everything_else_needs_a_token(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["schema"] == "0008"
    for method, path in [("GET", "/api/v1/runs"), ("POST", "/api/v1/runs"), ("GET", "/api/v1/experiments")]:
        response = client.request(method, path, json={})
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "unauthorized"
    assert client.get("/api/v1/runs", headers=auth("not-a-token")).status_code == 401


def test_read_only_tokens_can_look_but_not_submit(client: TestClient, settings: Any) -> None:
    assert client.get("/api/v1/runs", headers=auth(READER)).status_code == 200
    response = client.post("/api/v1/runs", json=TINY, headers=auth(READER))
    assert response.status_code == 403 and "read-only" in response.json()["detail"]
    assert count_rows(settings, Run) == 0


def test_submit_records_a_queued_run_with_its_config_hash(client: TestClient) -> None:
    response = client.post("/api/v1/runs", json={**TINY, "experiment": "exp-a"}, headers=auth())
    assert response.status_code == 202
    run = response.json()
    assert run["status"] == "queued" and run["experiment"] == "exp-a" and run["launcher"] == "dryrun"
    assert run["config"]["optim"]["epochs"] == 1 and len(run["config_hash"]) == 64
    assert run["name"] == "selfpatch-vit_tiny4-ep1-s0"
    shown = client.get(f"/api/v1/runs/{run['id']}", headers=auth(READER)).json()
    assert shown == run  # the reply is what was recorded, field for field
    listed = client.get("/api/v1/runs", headers=auth(READER)).json()["items"]
    assert listed == [{k: v for k, v in shown.items() if k != "config"}]  # a list item: all but the config
    events = client.get(f"/api/v1/runs/{run['id']}/events", headers=auth()).json()["items"]
    assert [(e["from_status"], e["to_status"], e["actor"]) for e in events] == [(None, "queued", "admin")]
    experiments = client.get("/api/v1/experiments", headers=auth()).json()["items"]
    assert [e["name"] for e in experiments] == ["exp-a"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({**TINY, "bogus": 1}, 422, "bogus"),
        ({**TINY, "resources": {"gpus_per_node": -1}}, 422, "resources.gpus_per_node"),
        ({**TINY, "resources": {"extra": {"uid": "0"}}}, 422, "resources.extra"),
        ({**TINY, "launcher": "kubernetes"}, 422, "launcher"),
        ({**TINY, "overrides": ["selfpatch.k=12"]}, 422, "selfpatch.k"),
        ({**TINY, "overrides": ["optim.epochs=many"]}, 422, "optim.epochs"),
        ({**TINY, "overrides": ["selfpatch.kk=2"]}, 422, "selfpatch.kk"),
        ({"config": {"selfpatch": {"k": "four"}}, "launcher": "dryrun"}, 422, "config.selfpatch.k"),
        ({"config": {"optim": {"lr": -1}}, "launcher": "dryrun"}, 422, "config.optim.lr"),
        ({"preset": "no_such_preset", "launcher": "dryrun"}, 422, "preset"),
        ({"experiment": "", "preset": "tiny_cpu"}, 422, "experiment"),
    ],
)
def test_bad_submissions_name_the_field_and_write_nothing(
    client: TestClient, settings: Any, body: dict[str, Any], status: int, field: str
) -> None:
    response = client.post("/api/v1/runs", json=body, headers=auth())
    assert response.status_code == status, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert {"type", "title", "status", "detail", "instance"} <= set(problem)
    assert problem["errors"][0]["field"] == field, problem
    assert count_rows(settings, Run) == 0 and count_rows(settings, Event) == 0


def test_malformed_json_is_a_400_problem_and_writes_nothing(client: TestClient, settings: Any) -> None:
    response = client.post(
        "/api/v1/runs", content=b'{"preset": "tiny_cpu",', headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_json" and response.json()["errors"][0]["field"] == "body"
    assert count_rows(settings, Run) == 0


def test_dry_run_renders_the_submission_without_side_effects(client: TestClient, settings: Any) -> None:
    response = client.post("/api/v1/runs?dry_run=true", json={**TINY, "launcher": "local"}, headers=auth())
    assert response.status_code == 200
    dry = response.json()
    assert "-m orchestrator.jobs" in dry["rendered"] and dry["launcher"] == "local" and len(dry["config_hash"]) == 64
    assert count_rows(settings, Run) == 0
    assert not (settings.home / "local-jobs").exists()


def test_idempotency_key_replays_and_refuses_a_different_body(client: TestClient, settings: Any) -> None:
    headers = {**auth(), "Idempotency-Key": "submit-1"}
    first = client.post("/api/v1/runs", json=TINY, headers=headers)
    again = client.post("/api/v1/runs", json=TINY, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = client.post("/api/v1/runs", json={**TINY, "overrides": ["optim.epochs=2"]}, headers=headers)
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert count_rows(settings, Run) == 1


def test_twenty_concurrent_submits_with_one_key_create_exactly_one_run(settings: Any) -> None:
    port = free_port()
    with EmbeddedService(settings, port=port, reconciler=False) as service:
        headers = {**auth(), "Idempotency-Key": f"race-{uuid.uuid4()}"}

        def submit(_: int) -> tuple[int, str]:
            response = httpx.post(f"{service.url}/api/v1/runs", json=TINY, headers=headers, timeout=60)
            return response.status_code, response.json().get("id", response.text)

        with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(submit, range(20)))
    assert {status for status, _ in results} == {202}, results
    assert len({run_id for _, run_id in results}) == 1
    assert count_rows(settings, Run) == 1 and count_rows(settings, IdempotencyRecord) == 1


def test_cursor_pagination_walks_every_run_once_newest_first(client: TestClient) -> None:
    ids = [client.post("/api/v1/runs", json=TINY, headers=auth()).json()["id"] for _ in range(5)]
    seen, token = [], None
    while True:
        params: dict[str, Any] = {"page_size": 2, **({"page_token": token} if token else {})}
        page = client.get("/api/v1/runs", params=params, headers=auth()).json()
        seen += [r["id"] for r in page["items"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == list(reversed(ids))
    bad = client.get("/api/v1/runs", params={"page_token": "garbage!"}, headers=auth())
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "page_token"
    filtered = client.get("/api/v1/runs", params={"status": "cancelled"}, headers=auth()).json()
    assert filtered["items"] == []


def test_cancel_retry_and_terminal_states(client: TestClient) -> None:
    run = client.post("/api/v1/runs", json=TINY, headers=auth()).json()
    cancelled = client.post(f"/api/v1/runs/{run['id']}/cancel", headers=auth())
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/api/v1/runs/{run['id']}/cancel", headers=auth())
    assert again.status_code == 409 and "terminal states never change" in again.json()["detail"]
    retried = client.post(f"/api/v1/runs/{run['id']}/retry", headers=auth())
    assert retried.status_code == 202
    new = retried.json()
    assert new["id"] != run["id"] and new["retry_of"] == run["id"] and new["config_hash"] == run["config_hash"]
    assert new["status"] == "queued"
    active = client.post(f"/api/v1/runs/{new['id']}/retry", headers=auth())
    assert active.status_code == 409
    assert client.get(f"/api/v1/runs/{uuid.uuid4()}", headers=auth()).status_code == 404
    assert client.get("/api/v1/runs/not-a-uuid", headers=auth()).json()["code"] == "not_found"


def test_job_reports_need_the_runs_own_token_and_drive_the_lifecycle(client: TestClient, settings: Any) -> None:
    run = client.post("/api/v1/runs", json=TINY, headers=auth()).json()
    Reconciler(settings, client.app.state.orch.db, client.app.state.orch.launchers).reconcile_once()  # type: ignore[attr-defined]
    assert client.get(f"/api/v1/runs/{run['id']}", headers=auth()).json()["status"] == "submitted"
    url = f"/api/v1/runs/{run['id']}/reports"
    start = {"kind": "start", "attempt": 1, "host": "node-7", "iteration": 0, "total_iterations": 100}
    assert client.post(url, json=start, headers=auth(ADMIN)).status_code == 401  # an admin token is not the run's
    other = job_token(settings.secret, uuid.uuid4())
    assert client.post(url, json=start, headers=auth(other)).status_code == 401
    token = job_token(settings.secret, run["id"])
    assert client.post(url, json=start, headers=auth(token)).status_code == 204
    shown = client.get(f"/api/v1/runs/{run['id']}", headers=auth()).json()
    assert shown["status"] == "running" and shown["attempts"][0]["host"] == "node-7"
    path = Path(run["output_dir"]) / "checkpoint0000.pth"  # a checkpoint the job wrote in its own folder
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights of epoch 1")
    checkpoint = {
        "kind": "checkpoint",
        "attempt": 1,
        "path": str(path),
        "epoch": 1,
        "iteration": 50,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "checkpoint_kind": "epoch",
    }
    for _ in range(2):  # recorded once however often it is reported
        assert client.post(url, json=checkpoint, headers=auth(token)).status_code == 204
    rows = client.get(f"/api/v1/runs/{run['id']}/checkpoints", headers=auth()).json()
    assert [(c["epoch"], c["step"], c["path"]) for c in rows] == [(1, 50, str(path))]
    end = {"kind": "end", "attempt": 1, "status": "completed", "iteration": 100}
    assert client.post(url, json=end, headers=auth(token)).status_code == 204
    # a report alone never makes a run succeed: only the reconciler, once the scheduler says the job exited
    assert client.get(f"/api/v1/runs/{run['id']}", headers=auth()).json()["status"] == "running"
    bad = client.post(url, json={"kind": "checkpoint", "attempt": 1}, headers=auth(token))
    assert bad.status_code == 422


def test_openapi_documents_every_route_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in [
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/cancel",
        "/api/v1/runs/{run_id}/retry",
        "/api/v1/runs/{run_id}/attempts",
        "/api/v1/runs/{run_id}/checkpoints",
        "/api/v1/runs/{run_id}/events",
        "/api/v1/runs/{run_id}/logs",
        "/api/v1/experiments",
        "/healthz",
    ]:
        assert path in paths, path
    assert spec["components"]["schemas"]["RunCreate"]["examples"][0]["preset"] == "tiny_cpu"
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_concurrent_first_submits_to_a_new_experiment_create_it_once(settings: Any) -> None:
    with EmbeddedService(settings, port=free_port(), reconciler=False) as service:

        def submit(_: int) -> int:
            payload = {**TINY, "experiment": "fresh-experiment"}
            return httpx.post(f"{service.url}/api/v1/runs", json=payload, headers=auth(), timeout=60).status_code

        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            statuses = list(pool.map(submit, range(10)))
        names = [e["name"] for e in httpx.get(f"{service.url}/api/v1/experiments", headers=auth()).json()["items"]]
    assert statuses == [202] * 10
    assert names == ["fresh-experiment"] and count_rows(settings, Run) == 10


def test_evaluations_are_jobs_over_rest_cancel_retry_reports_and_events(
    client: TestClient, settings: Any, tmp_path: Path
) -> None:
    from orchestrator.jobs.fake import FakeLauncher
    from orchestrator.launchers import Launchers
    from tests.support import FASHION_MNIST

    state = client.app.state.orch  # type: ignore[attr-defined]
    fake = FakeLauncher()
    state.launchers = Launchers(settings, fixed={"local": fake})
    reconciler = Reconciler(settings, state.db, state.launchers)
    run = client.post("/api/v1/runs", json={**TINY, "launcher": "local"}, headers=auth()).json()
    reconciler.reconcile_once()
    run_token = job_token(settings.secret, run["id"])
    path = Path(run["output_dir"]) / "checkpoint0000.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    report = {"kind": "checkpoint", "attempt": 1, "path": str(path), "epoch": 1, "iteration": 8, "sha256": sha}
    assert client.post(f"/api/v1/runs/{run['id']}/reports", json=report, headers=auth(run_token)).status_code == 204
    checkpoint = client.get(f"/api/v1/runs/{run['id']}/checkpoints", headers=auth()).json()[0]
    url = f"/api/v1/checkpoints/{checkpoint['id']}/evaluations"
    missing = client.post(url, json={"benchmark": "knn", "data": str(tmp_path / "nope")}, headers=auth())
    assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "data"
    spec = {"benchmark": "knn", "data": str(FASHION_MNIST), "max_attempts": 1}
    created = client.post(url, json=spec, headers=auth())
    assert created.status_code == 202 and created.json()["status"] == "queued" and created.json()["attempts"] == []
    evaluation = created.json()
    reconciler.reconcile_once()
    shown = client.get(f"/api/v1/evaluations/{evaluation['id']}", headers=auth(READER)).json()
    assert shown["status"] == "submitted" and [a["number"] for a in shown["attempts"]] == [1]
    reports = f"/api/v1/evaluations/{evaluation['id']}/reports"
    start = {"kind": "start", "attempt": 1, "host": "node-3"}
    assert client.post(reports, json=start, headers=auth(run_token)).status_code == 401  # the run's token is not its
    eval_token = job_token(settings.secret, evaluation["id"])
    assert client.post(reports, json=start, headers=auth(eval_token)).status_code == 204
    assert client.get(f"/api/v1/evaluations/{evaluation['id']}", headers=auth()).json()["status"] == "running"
    assert client.post(f"/api/v1/evaluations/{evaluation['id']}/cancel", headers=auth(READER)).status_code == 403
    cancelled = client.post(f"/api/v1/evaluations/{evaluation['id']}/cancel", headers=auth())
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert fake.cancelled == [fake.job_of(evaluation["id"])]
    assert client.post(f"/api/v1/evaluations/{evaluation['id']}/cancel", headers=auth()).status_code == 409
    events = client.get(f"/api/v1/evaluations/{evaluation['id']}/events", headers=auth()).json()["items"]
    assert [e["to_status"] for e in events if e["to_status"]] == ["queued", "submitted", "running", "cancelled"]
    retried = client.post(f"/api/v1/evaluations/{evaluation['id']}/retry", headers=auth())
    assert retried.status_code == 202 and retried.json()["retry_of"] == evaluation["id"]
    again = client.post(url, json=spec, headers=auth())  # the live retry answers for the same evaluation
    assert again.status_code == 200 and again.json()["id"] == retried.json()["id"]
    assert client.post(f"/api/v1/evaluations/{retried.json()['id']}/retry", headers=auth()).status_code == 409


def test_the_api_and_the_reconciler_never_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, time; t = time.perf_counter(); import api.main, orchestrator.reconciler, orchestrator.jobs.fake; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'torchvision', 'mlflow', 'ray'}); "
        "print(heavy, round(time.perf_counter() - t, 2))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("]")[0] + "]" == "[]", out
