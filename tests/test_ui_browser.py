"""The web UI in a real browser: Playwright driving the system Chromium against `orchestrator serve` with real
runs (local launcher), a tiny sweep with k-NN evaluations and a real MLflow server.

Screenshots of each page are saved to docs/screenshots/ (the README shows them)."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.db.models import Job
from orchestrator.db.session import Database
from tests.support import ADMIN, MICRO, READER, REPO, Service, get, post, submit, tiny_sweep, wait_for

pytestmark = pytest.mark.slow  # real runs, a sweep and its evaluations

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO / "docs" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # the system Chromium, never `playwright install` (it would download browsers)
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


def log_in(browser: Any, url: str, token: str, start: str = "/") -> Any:
    page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
    page.goto(url + start)
    assert "/login" in page.url  # no page without a token
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    return page


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_the_web_ui_in_a_real_browser(tmp_path: Path, mlflow_server: str, browser: Any) -> None:
    db_url = f"sqlite:///{tmp_path / 'orch.db'}"
    service = Service(
        tmp_path / "home",
        db_url,
        ORCH_READ_TOKENS=f"viewer:{READER}",
        ORCH_LOCAL_MAX_CONCURRENT="3",
        ORCH_MLFLOW_TRACKING_URI=mlflow_server,
    )
    service.start()
    try:
        url = service.url
        # the login page, then the run list; a sweep submitted after the page loaded
        anonymous = browser.new_context().new_page()
        anonymous.goto(url + "/")
        assert anonymous.url.startswith(url + "/login")
        shot(anonymous, "login")
        page = log_in(browser, url, ADMIN)
        assert page.url == url + "/"
        page.evaluate("window.__loaded_once = true")  # survives only if the page is never reloaded
        created = post(url, "/sweeps", tiny_sweep("ui-tiny"))
        assert created.status_code == 201, created.text
        sweep = created.json()["sweep"]
        first = sweep["trials"][0]["run_id"]
        row = page.locator(f'tr[data-run="{first}"]')
        row.wait_for(timeout=30_000)  # appeared by htmx polling, not by a reload
        row.locator('.badge[data-status="succeeded"]').wait_for(timeout=600_000)
        assert page.evaluate("window.__loaded_once") is True
        shot(page, "runs")

        # a run page: curves from MLflow with data points, checkpoints, evaluation numbers
        wait_for(
            lambda: any(e["status"] == "succeeded" for e in get(url, f"/runs/{first}/evaluations")),
            600,
            "the trial's k-NN evaluation",
        )
        page.goto(f"{url}/runs/{first}")
        loss = page.locator('#curves .chart[data-metric="train/loss"]')
        loss.wait_for(timeout=60_000)
        assert int(loss.get_attribute("data-points") or 0) >= 2  # 16 steps logged every 10, and the last
        assert page.locator("#curves .chart .main-svg").count() >= 1  # Plotly drew it
        checkpoints = get(url, f"/runs/{first}/checkpoints")
        assert page.locator("#evaluations tbody tr").count() == len(checkpoints) >= 1
        top1 = next(e for e in get(url, f"/runs/{first}/evaluations") if e["status"] == "succeeded")
        shown = f"{top1['metrics']['knn/top1_k20']:.2f}"
        assert shown in page.locator("#evaluations").inner_text()
        shot(page, "run")

        # MLflow's UI on the same server, at the same run
        run = get(url, f"/runs/{first}")
        with page.context.expect_page() as opened:
            page.click("#mlflow-link")
        mlflow_page = opened.value
        mlflow_page.wait_for_load_state()
        assert mlflow_page.url.startswith(f"{url}/mlflow/") and run["mlflow_run_id"] in mlflow_page.url
        mlflow_page.get_by_text(run["name"]).first.wait_for(timeout=120_000)
        shot(mlflow_page, "mlflow")
        mlflow_page.close()

        # cancel a long run from the UI; the state lands in SQL
        long_run = submit(url, {"experiment": "ui", "preset": "tiny_cpu", "overrides": [*MICRO, "optim.epochs=400"]})
        page.goto(f"{url}/runs/{long_run['id']}")
        page.once("dialog", lambda dialog: dialog.accept())  # "Cancel run ...?"
        page.click("#cancel")
        page.wait_for_url(f"{url}/runs/{long_run['id']}")
        page.locator('#run-status .badge[data-status="cancelled"]').wait_for(timeout=30_000)
        database = Database(db_url)
        try:
            with database.sessions() as session:
                job = session.get(Job, uuid.UUID(long_run["id"]))
                assert job is not None and job.status == "cancelled"
        finally:
            database.dispose()

        # the sweep page: matrix, report table with the REST report's numbers, plots
        wait_for(lambda: get(url, f"/sweeps/{sweep['id']}")["status"] == "completed", 900, "the sweep to complete")
        page.goto(f"{url}/sweeps/{sweep['id']}")
        report = get(url, f"/sweeps/{sweep['id']}/report")["primary"]
        table = page.locator('table.report[data-metric="knn/top1_k20"]')
        text = table.inner_text()
        for arm in report["arms"]:
            assert arm["arm"] in text and f"{arm['mean']:.2f}" in text
        verdict = report["comparisons"][0]["verdict"]
        assert table.locator(f".verdict.v-{verdict.replace(' ', '-')}").count() == 1
        assert page.locator("#sweep-matrix td .badge").count() == 4
        assert page.locator(".plots img").count() >= 2
        page.wait_for_function(
            "[...document.querySelectorAll('.plots img')].every(i => i.complete && i.naturalWidth > 0)", timeout=60_000
        )
        shot(page, "sweep")

        # compare two trials, the evaluations list with the paper column, the sweeps list
        second = sweep["trials"][1]["run_id"]
        page.goto(f"{url}/compare?run={first}&run={second}")
        page.locator('#curves .chart[data-metric="train/loss"]').wait_for(timeout=60_000)
        rows = [line.split("\t") for line in page.locator("#final-metrics").inner_text().splitlines()]
        top1 = next(r for r in rows if r[0] == "knn/top1_k20")
        assert len(top1) == 3 and all(re.fullmatch(r"\d+\.\d\d", v) for v in top1[1:])
        shot(page, "compare")
        page.goto(f"{url}/evaluations")
        assert page.locator("#evaluation-list tbody tr").count() >= 4
        shot(page, "evaluations")
        page.goto(f"{url}/sweeps")
        assert "ui-tiny" in page.inner_text("main")
        shot(page, "sweeps")

        # a read token sees everything and can act on nothing
        reader = log_in(browser, url, READER, start=f"/runs/{first}")
        assert reader.url == f"{url}/runs/{first}"  # the login brought it back where it started
        assert reader.locator("#cancel, #retry").count() == 0
        csrf = json.loads(reader.get_attribute("body", "hx-headers") or "{}")["X-CSRF-Token"]
        refused = reader.request.post(f"{url}/runs/{second}/retry", form={"csrf": csrf})
        assert refused.status == 403
        assert len(get(url, "/runs")["items"]) == 5  # nothing was retried
    finally:
        service.stop()


def test_pages_answer_nothing_to_a_browser_without_a_login(tmp_path: Path, browser: Any) -> None:
    service = Service(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}")
    service.start()
    try:
        page = browser.new_context().new_page()
        for path in ("/", "/sweeps", "/evaluations", "/compare", "/mlflow/"):
            page.goto(service.url + path)
            assert page.url.startswith(service.url + "/login"), path
            assert "Paste an API token" in page.inner_text("main")
        assert httpx.get(f"{service.url}/fragments/runs", timeout=10, follow_redirects=False).status_code == 303
    finally:
        service.stop()
