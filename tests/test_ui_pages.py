"""The web UI without a browser: the login cookie and CSRF token, who may see and act, the pages' content,
curve downsampling, and MLflow's UI mounted behind the same login (in-process over a local store)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.ui import session
from api.ui.charts import CurveCache, curves, downsample
from api.ui.mlflow_mount import read_only
from api.ui.pages import _safe_next, router
from orchestrator.mlflow_bridge import MlflowBridge
from tests.support import ADMIN, READER, auth, make_settings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(
        tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}", f"sqlite:///{tmp_path}/ml/mlflow.db"
    )
    with TestClient(create_app(settings)) as c:
        yield c


def login(client: TestClient, token: str = ADMIN) -> str:
    response = client.post("/login", data={"token": token, "next": "/"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and token not in cookie
    return csrf_of(client.get("/").text)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def submit(client: TestClient, *overrides: str, experiment: str = "ui") -> str:
    body = {"experiment": experiment, "preset": "tiny_cpu", "overrides": list(overrides), "launcher": "dryrun"}
    response = client.post("/api/v1/runs", json=body, headers=auth())
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_the_session_cookie_is_signed_expires_and_binds_the_csrf_token() -> None:
    secret = b"s" * 32
    cookie = session.issue(secret, "tok", now=1000)
    found = session.verify(secret, cookie, now=1001)
    assert found is not None and found.token_fingerprint == session.fingerprint("tok")
    assert session.verify(secret, cookie, now=1000 + session.LIFETIME_S + 1) is None  # expired
    assert session.verify(b"t" * 32, cookie, now=1001) is None  # another server's secret
    fp, expires, mac = cookie.split(".")
    assert session.verify(secret, f"{fp}.{int(expires) + 10**6}.{mac}", now=1001) is None  # extended by hand
    assert session.verify(secret, "garbage", now=1001) is None and session.verify(secret, None) is None
    token = session.csrf_token(secret, cookie)
    assert session.csrf_ok(secret, cookie, token)
    assert not session.csrf_ok(secret, session.issue(secret, "tok", now=2000), token)  # another session's
    assert not session.csrf_ok(secret, cookie, None) and not session.csrf_ok(secret, cookie, "0" * 64)


def test_downsampling_keeps_extremes_endpoints_and_the_budget() -> None:
    points = [(i, float(i % 100)) for i in range(100_000)]
    points[54_321] = (54_321, 1e6)  # a spike a stride would miss
    out = downsample(points, 1000)
    assert len(out) <= 1000
    assert out[0] == (0, 0.0) and out[-1] == (99_999, 99.0)
    assert (54_321, 1e6) in out
    assert [s for s, _ in out] == sorted(s for s, _ in out)
    assert downsample([(2, 1.0), (1, float("nan")), (0, 3.0)]) == [(0, 3.0), (2, 1.0)]  # sorted, NaN dropped


def test_login_redirects_only_within_the_site() -> None:
    assert _safe_next("/runs/x?y=1") == "/runs/x?y=1"
    for bad in ("https://evil.example/", "//evil.example/", "/\\evil", "", None):
        assert _safe_next(bad) == "/"


def test_mlflow_read_tokens_may_only_look() -> None:
    assert read_only("GET", "/mlflow/ajax-api/2.0/mlflow/runs/get")
    assert read_only("POST", "/mlflow/ajax-api/2.0/mlflow/runs/search")
    assert not read_only("POST", "/mlflow/ajax-api/2.0/mlflow/runs/delete")
    assert not read_only("POST", "/mlflow/ajax-api/2.0/mlflow/runs/set-tag")
    assert not read_only("DELETE", "/mlflow/ajax-api/2.0/mlflow/experiments/delete")


def test_no_page_fragment_or_mlflow_without_a_login(client: TestClient) -> None:
    run_id = submit(client)
    paths = [r.path for r in router.routes if "GET" in getattr(r, "methods", set()) and r.path != "/login"]  # type: ignore[attr-defined]
    assert len(paths) >= 10
    for path in paths:
        concrete = path.replace("{run_id}", run_id).replace("{sweep_id}", run_id).replace("{name}", "metric.svg")
        response = client.get(concrete, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next="), path
    fragment = client.get("/fragments/runs", headers={"HX-Request": "true"}, follow_redirects=False)
    assert fragment.status_code == 401 and fragment.headers["HX-Redirect"].startswith("/login")
    assert client.get("/mlflow/", follow_redirects=False).status_code == 303
    assert client.get("/mlflow/ajax-api/2.0/mlflow/experiments/search?max_results=5").status_code == 401
    client.cookies.set(session.COOKIE, "forged.99999999999.00")
    assert client.get("/", follow_redirects=False).status_code == 303
    assert client.post("/login", data={"token": "wrong", "next": "/"}).status_code == 401
    # a bearer token is not a login: the pages are for browsers, the API for programs
    assert client.get("/", headers=auth(), follow_redirects=False).status_code == 303


def test_a_read_token_sees_but_cannot_act(client: TestClient) -> None:
    run_id = submit(client)
    csrf = login(client, READER)
    page = client.get("/")
    assert page.status_code == 200 and run_id in page.text and "Cancel" not in page.text
    refused = client.post(f"/runs/{run_id}/cancel", data={"csrf": csrf})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert client.get(f"/api/v1/runs/{run_id}", headers=auth()).json()["status"] == "queued"
    assert client.get("/mlflow/ajax-api/2.0/mlflow/experiments/search?max_results=5").status_code == 200
    assert client.post("/mlflow/ajax-api/2.0/mlflow/experiments/create", json={"name": "x"}).status_code == 403


def test_an_admin_acts_only_with_this_sessions_csrf_token(client: TestClient) -> None:
    run_id = submit(client)
    csrf = login(client)
    assert client.post(f"/runs/{run_id}/cancel", data={"csrf": "0" * 64}).status_code == 403
    assert client.post(f"/runs/{run_id}/cancel").status_code == 403
    assert client.get(f"/api/v1/runs/{run_id}", headers=auth()).json()["status"] == "queued"
    done = client.post(f"/runs/{run_id}/cancel", data={"csrf": csrf}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/runs/{run_id}"
    assert client.get(f"/api/v1/runs/{run_id}", headers=auth()).json()["status"] == "cancelled"
    again = client.post(f"/runs/{run_id}/retry", headers={session.CSRF_HEADER: csrf}, follow_redirects=False)
    assert again.status_code == 303
    new_id = again.headers["location"].rsplit("/", 1)[-1]
    assert client.get(f"/api/v1/runs/{new_id}", headers=auth()).json()["status"] == "queued"
    out = client.post("/logout", data={"csrf": csrf}, follow_redirects=False)
    assert out.status_code == 303 and client.get("/", follow_redirects=False).status_code == 303


def test_the_run_list_filters_and_pages_server_side(client: TestClient) -> None:
    dino = submit(client, "method=dino", experiment="alpha")
    selfpatch = [submit(client, experiment="beta") for _ in range(3)]
    login(client)
    only_dino = client.get("/?method=dino").text
    assert dino in only_dino and not any(s in only_dino for s in selfpatch)
    beta = client.get("/?experiment=beta&status=queued").text
    assert all(s in beta for s in selfpatch) and dino not in beta
    assert dino not in client.get("/?status=running").text
    assert client.get("/?method=bogus").status_code == 422
    unfiltered = client.get("/?experiment=&method=&launcher=&sweep=")  # the form's empty fields: no filter
    assert unfiltered.status_code == 200 and all(r in unfiltered.text for r in [dino, *selfpatch])
    fragment = client.get("/fragments/runs?experiment=alpha")
    assert fragment.status_code == 200 and dino in fragment.text and "<html" not in fragment.text


def test_the_run_page_shows_the_diff_against_its_preset_and_the_lifecycle(client: TestClient) -> None:
    run_id = submit(client, "optim.lr=0.0123")
    login(client)
    page = client.get(f"/runs/{run_id}").text
    assert "Differences from preset tiny_cpu" in page and "optim.lr=0.0123" in page
    assert re.search(r"<code>optim\.lr</code></td><td>[^<]+</td><td><b>0\.0123</b>", page)
    assert "queued" in page and "submitted by user" in page
    curves = client.get(f"/runs/{run_id}/curves.json").json()
    assert curves == {"run": run_id, "curves": {}}  # not started: no MLflow run yet
    assert client.get("/runs/00000000-0000-0000-0000-000000000000").status_code == 404


def test_compare_and_evaluations_pages(client: TestClient) -> None:
    a = submit(client, "optim.lr=0.001")
    b = submit(client, "optim.lr=0.002")
    login(client)
    page = client.get(f"/compare?run={a}&run={b}").text
    assert "<code>optim.lr</code>" in page and "0.001" in page and "0.002" in page
    assert "No evaluations yet" in client.get("/evaluations").text
    assert client.get("/sweeps").status_code == 200


def test_the_papers_numbers_stand_beside_ours_only_for_its_own_benchmarks() -> None:
    from types import SimpleNamespace

    from api.ui.pages import _paper

    det = SimpleNamespace(benchmark="det", metrics={"det/bbox_AP": 1.2, "det/segm_AP": 0.9, "det/AP50": 3.0})
    assert _paper(det, SimpleNamespace(method="selfpatch")) == {"det/bbox_AP": "42.1", "det/segm_AP": "38.5"}  # type: ignore[arg-type]
    seg = SimpleNamespace(benchmark="seg", metrics={"seg/mIoU": 9.6})
    assert _paper(seg, SimpleNamespace(method="dino")) == {"seg/mIoU": "38.3"}  # type: ignore[arg-type]
    knn = SimpleNamespace(benchmark="knn", metrics={"knn/top1_k20": 60.0})
    assert _paper(knn, SimpleNamespace(method="dino")) == {}  # type: ignore[arg-type]


def test_parallel_coordinates_put_each_trial_through_its_settings_and_objective() -> None:
    from api.ui.pages import parcoords

    trials = [({"optim": {"lr": 0.001, "epochs": 2}}, 51.0), ({"optim": {"lr": 0.01}}, None)]
    spec = parcoords(["optim.lr", "optim.epochs"], trials, "knn/top1_k20")
    assert spec["dimensions"] == [
        {"label": "optim.lr", "values": [0.001, 0.01]},
        {"label": "optim.epochs", "values": [2.0, None]},
        {"label": "knn/top1_k20", "values": [51.0, None]},
    ]


def test_mlflow_ui_is_mounted_behind_the_login(client: TestClient) -> None:
    login(client)
    index = client.get("/mlflow/")
    assert index.status_code == 200 and "static-files/static/js/main" in index.text
    asset = re.search(r'src="(static-files/static/js/[^"]+)"', index.text)
    assert asset and client.get(f"/mlflow/{asset.group(1)}").status_code == 200
    search = client.get("/mlflow/ajax-api/2.0/mlflow/experiments/search?max_results=5")
    assert search.status_code == 200 and "experiments" in search.json()


def test_static_javascript_is_served_locally(client: TestClient) -> None:
    plotly = client.get("/static/plotly/plotly.min.js")
    assert plotly.status_code == 200 and len(plotly.content) > 1_000_000
    assert client.get("/static/vendor/htmx-2.0.11.min.js").status_code == 200
    login(client)
    page = client.get("/").text
    assert "http://" not in page.replace("http://testserver", "") and "https://" not in page


class CountingBridge(MlflowBridge):
    """A real MLflow client that counts full-history reads."""

    full_reads = 0

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        self.full_reads += 1
        return super().metric_history(run_id, key)


def _log(bridge: MlflowBridge, run_id: str, steps: range) -> None:
    from mlflow.entities import Metric

    bridge.client.log_batch(run_id, metrics=[Metric("train/loss", 1.0 / (s + 1), 0, s) for s in steps])


@pytest.mark.parametrize("store", ["sqlite", pytest.param("server", marks=pytest.mark.services)])
def test_a_running_runs_curve_grows_by_the_new_points_only(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri = request.getfixturevalue("mlflow_server") if store == "server" else f"sqlite:///{tmp_path}/mlflow.db"
    bridge = CountingBridge(uri)
    run_id = bridge.create_run(bridge.experiment_id(f"curves-{store}-{tmp_path.name}"), "r", {})
    _log(bridge, run_id, range(0, 50))
    cache = CurveCache()
    first = curves(bridge, cache, run_id, ["train/loss"], finished=False)["train/loss"]
    assert first["steps"] == list(range(50)) and bridge.full_reads == 1
    _log(bridge, run_id, range(50, 60))
    assert bridge.metric_after(run_id, "train/loss", 49) == [(s, 1.0 / (s + 1)) for s in range(50, 60)]
    grown = curves(bridge, cache, run_id, ["train/loss"], finished=False)["train/loss"]
    assert grown["steps"] == list(range(60)) and bridge.full_reads == 1  # only the ten new points were read
    done = curves(bridge, cache, run_id, ["train/loss"], finished=True)["train/loss"]
    _log(bridge, run_id, range(60, 70))  # a finished run's history is read no more
    assert curves(bridge, cache, run_id, ["train/loss"], finished=True)["train/loss"] == done
    assert bridge.full_reads == 1
    assert bridge.metric_after(run_id, "train/loss", 0, limit=5) is None  # more than the limit: read it all


def test_a_store_left_half_migrated_by_a_kill_is_finished_not_refused(tmp_path: Path) -> None:
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    engine = sqlalchemy.create_engine(uri)
    Base.metadata.create_all(engine)  # what MLflow does first, then the migrations; killed after one of them
    command.upgrade(_get_alembic_config(uri), "75868b020152")
    engine.dispose()
    bridge = MlflowBridge(uri)
    run_id = bridge.create_run(bridge.experiment_id("after-a-kill"), "r", {})
    assert MlflowBridge(uri).client.get_run(run_id).info.run_name == "r"
