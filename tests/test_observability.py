"""Observability: /metrics (its token, route-template labels, the reconciler's metrics), request ids and
JSON log lines. Metrics live in the process-wide registry, so counters are compared before and after."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from api.observability import JsonFormatter, Observability, RequestIdFilter, route_template
from orchestrator import metrics
from orchestrator.jobs.fake import FakeLauncher
from orchestrator.launchers import Launchers
from orchestrator.reconciler import Reconciler
from orchestrator.settings import Settings
from tests.support import READER, REPO, auth, make_settings

TINY = {"preset": "tiny_cpu", "overrides": ["optim.epochs=1"], "launcher": "dryrun"}
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def settings_for(tmp_path: Path, db_url: str | None = None, **extra: Any) -> Settings:
    return make_settings(tmp_path / "home", db_url or f"sqlite:///{tmp_path / 'orch.db'}", **extra)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tmp_path))) as test_client:
        yield test_client


def scrape(client: TestClient, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of /metrics, keyed by sample name and labels."""
    response = client.get("/metrics", headers=auth(READER) if headers is None else headers)
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_need_a_token_unless_public(client: TestClient, tmp_path: Path) -> None:
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
    assert client.get("/metrics", headers=auth("not-a-token")).status_code == 401
    allowed = client.get("/metrics", headers=auth(READER))
    assert allowed.status_code == 200 and allowed.headers["content-type"].startswith("text/plain")
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    with TestClient(create_app(settings_for(tmp_path / "public", metrics_public=True))) as public:
        assert public.get("/metrics").status_code == 200


def test_request_latency_is_labelled_by_route_template_and_status(client: TestClient) -> None:
    before = scrape(client)
    missing = [str(uuid.uuid4()) for _ in range(2)]
    for run_id in missing:
        assert client.get(f"/api/v1/runs/{run_id}", headers=auth()).status_code == 404
    assert client.get("/api/v1/runs", headers=auth()).status_code == 200
    assert client.get(f"/no/such/{missing[0]}").status_code == 404
    assert client.post("/healthz").status_code == 405
    client.request("BREW", "/healthz")  # any method a client invents shares one label value
    after = scrape(client)

    def delta(**labels: str) -> float:
        name = "orch_http_request_duration_seconds_count"
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(method="GET", route="/api/v1/runs/{run_id}", status="404") == 2
    assert delta(method="GET", route="/api/v1/runs", status="200") == 1
    assert delta(method="GET", route="<unmatched>", status="404") == 1
    assert delta(method="POST", route="/healthz", status="405") == 1
    assert delta(method="OTHER", route="/healthz", status="405") == 1
    routes = {dict(labels).get("route") for name, labels in after if name.startswith("orch_http_request")}
    assert "/metrics" not in routes  # scrapes are left out
    assert not any(run_id in str(route) for route in routes for run_id in missing)  # never a raw path


def test_a_matched_routes_template_is_the_one_matching_again_would_find(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The label comes from the route the router matched (a table lookup), not from matching every route
    again after the response; both give the same template, included routers' prefixes and 405s alike."""
    seen: list[tuple[str, str, str, bool]] = []
    looked_up = Observability._template

    def spy(self: Observability, arrived: Any, matched: Any) -> str:
        template = looked_up(self, arrived, matched)
        from_table = matched is not None and id(matched) in (self._templates or {})
        seen.append((arrived["path"], template, route_template(arrived), from_table))
        return template

    monkeypatch.setattr(Observability, "_template", spy)
    run = uuid.uuid4()
    for method, path in [
        ("GET", "/api/v1/runs"),
        ("GET", f"/api/v1/runs/{run}"),
        ("GET", f"/api/v1/runs/{run}/events"),
        ("DELETE", "/api/v1/runs"),
        ("GET", "/api/v1/sweeps/x/report"),
        ("POST", "/healthz"),
        ("GET", "/"),
        ("GET", f"/runs/{run}"),
        ("GET", "/no/such/page"),
        ("GET", "/mlflow/ajax-api/2.0/mlflow/experiments/search"),
    ]:
        client.request(method, path, headers=auth(), follow_redirects=False)
    assert [(path, template, again) for path, template, again, _ in seen if template != again] == []
    assert {template for _, template, _, from_table in seen if from_table} >= {
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/events",
        "/api/v1/sweeps/{sweep}/report",
        "/healthz",
        "/runs/{run_id}",
    }
    assert ("/no/such/page", "<unmatched>", "<unmatched>", False) in seen


def test_request_ids_round_trip(client: TestClient) -> None:
    given = client.get("/healthz", headers={"X-Request-ID": "trace-42.a_b"})
    assert given.headers["X-Request-ID"] == "trace-42.a_b"
    for bad in ("has space", "x" * 65, "semi;colon", ""):
        replaced = client.get("/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert HEX_ID.match(replaced), (bad, replaced)
    made = [client.get("/healthz").headers["X-Request-ID"] for _ in range(2)]
    assert all(HEX_ID.match(i) for i in made) and made[0] != made[1]
    problem = client.get("/api/v1/runs", headers={"X-Request-ID": "on-errors-too"})
    assert problem.status_code == 401 and problem.headers["X-Request-ID"] == "on-errors-too"


def test_json_logs_carry_the_request_id_and_an_access_line(tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    app = create_app(settings_for(tmp_path, log_format="json"))

    @app.get("/test/log", include_in_schema=False)
    def log_inside() -> dict[str, str]:  # a sync handler: runs in a worker thread, the id must follow it
        logging.getLogger("tests.observability").info("inside %s", "the handler", extra={"answer": 42})
        return {}

    try:
        with TestClient(app) as client:
            assert client.get("/test/log", headers={"X-Request-ID": "req-1"}).status_code == 200
        logging.getLogger("tests.observability").info("outside")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    inside = next(line for line in lines if line["message"] == "inside the handler")
    assert inside["request_id"] == "req-1" and inside["answer"] == 42
    assert inside["logger"] == "tests.observability" and inside["level"] == "INFO" and "time" in inside
    access = next(line for line in lines if line["logger"] == "api.access")
    assert access["request_id"] == "req-1" and access["method"] == "GET" and access["route"] == "/test/log"
    assert access["status"] == 200 and access["path"] == "/test/log" and access["duration_ms"] >= 0
    assert next(line for line in lines if line["message"] == "outside")["request_id"] is None


def test_a_reconciler_pass_records_its_duration_jobs_queues_and_launcher_errors(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "GAUGE_INTERVAL_S", 0.0)  # recount after every pass (the default: every 15 s)
    settings = settings_for(tmp_path, db_url)
    with TestClient(create_app(settings)) as client:
        state = client.app.state.orch  # type: ignore[attr-defined]
        fake = FakeLauncher(capacity=0)  # "local" is full: its runs wait in the queue
        state.launchers = Launchers(settings, fixed={"local": fake})
        reconciler = Reconciler(settings, state.db, state.launchers)
        for launcher in ("dryrun", "dryrun", "local", "local"):
            assert client.post("/api/v1/runs", json={**TINY, "launcher": launcher}, headers=auth()).status_code == 202
        before = scrape(client)
        reconciler.reconcile_once()
        first = scrape(client)
        fake.free, fake.refuse_next = None, "the scheduler is down"  # room now, but one submission fails
        reconciler.reconcile_once()
        second = scrape(client)

    passes = "orch_reconcile_pass_seconds_count"
    assert value(first, passes) - value(before, passes) == 1 and value(second, passes) - value(first, passes) == 1
    assert value(first, "orch_jobs", kind="train", status="submitted") == 2
    assert value(first, "orch_jobs", kind="train", status="queued") == 2
    assert value(first, "orch_jobs", kind="evaluate", status="running") == 0  # every pair is written
    assert value(first, "orch_queue_depth", launcher="local", queue="train") == 2
    assert value(second, "orch_queue_depth", launcher="local", queue="train") == 0  # emptied, not stale
    assert value(second, "orch_jobs", kind="train", status="queued") == 0
    assert value(second, "orch_jobs", kind="train", status="failed") == 1
    errors = "orch_launcher_errors_total"
    labels = {"launcher": "local", "operation": "submit"}
    assert value(first, errors, **labels) == value(before, errors, **labels)
    assert value(second, errors, **labels) - value(first, errors, **labels) == 1


#: A service process that serves some requests, then (with "scrape") prints /metrics.
WORKER = """
import sys
from fastapi.testclient import TestClient
from api.main import create_app
with TestClient(create_app()) as client:
    for _ in range(int(sys.argv[1])):
        client.get("/healthz")
    if sys.argv[2:] == ["scrape"]:
        print(client.get("/metrics").text)
"""


def test_multiprocess_mode_serves_the_sum_over_processes(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (read when prometheus_client is imported, hence fresh interpreters),
    a process's /metrics includes what an earlier process in the same folder counted."""
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "ORCH_HOME": str(tmp_path / "home"),
        "ORCH_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "ORCH_METRICS_PUBLIC": "true",
    }
    subprocess.run([sys.executable, "-c", WORKER, "3"], env=env, cwd=REPO, check=True, capture_output=True)
    second = subprocess.run(
        [sys.executable, "-c", WORKER, "1", "scrape"], env=env, cwd=REPO, check=True, capture_output=True, text=True
    )
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(second.stdout)
        for sample in family.samples
    }
    name = "orch_http_request_duration_seconds_count"
    assert value(samples, name, method="GET", route="/healthz", status="200") == 4
    assert len(list(folder.glob("*.db"))) >= 2  # one file per process and metric type
