"""Web UI speed: the run list with 10,000 runs recorded, and a run page whose loss curve has 100,000 points.

Each row has its baseline measured in the same run:

* run list: the first page (50 runs, server-side pagination) and a deep page vs rendering all 10,000 runs
  on one page (what a list without pagination would do); server time per request, page size in bytes.
* curves: `curves.json` for the 100k-point run, min/max-downsampled to 1,000 points (first request, then
  cached because the run has finished; and, for the same run while it trains, a refresh after 100 more
  points) vs the raw history (every point, JSON-encoded).
* drawing (when Chromium is installed): Plotly drawing the downsampled curve vs all 100k points, timed in
  the page by `performance.now()`.

    python benchmarks/ui_pages.py [--runs 10000] [--points 100000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastapi.testclient import TestClient  # noqa: E402

import api.ui.pages as pages  # noqa: E402
from api.main import create_app  # noqa: E402
from orchestrator.db.models import Experiment, Run, utcnow  # noqa: E402
from orchestrator.db.session import Database  # noqa: E402
from orchestrator.lifecycle import Status  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402

TOKEN = "bench-admin-token"


def seed_runs(db_url: str, home: Path, count: int) -> uuid.UUID:
    """`count` finished runs with a realistic config; returns the id of the newest."""
    from trainer.presets import read_yaml, resolve_preset, validate_config

    config = validate_config(read_yaml(resolve_preset("tiny_cpu"))).model_dump(mode="json")
    db = Database(db_url)
    now = utcnow()
    newest = uuid.uuid4()
    with db.transaction() as session:
        experiment = Experiment(name="ui-bench", description="", eval_policy={})
        session.add(experiment)
        session.flush()
        for i in range(count):
            run_id = newest if i == count - 1 else uuid.uuid4()
            folder = home / "runs" / str(run_id)
            session.add(
                Run(
                    id=run_id,
                    experiment_id=experiment.id,
                    name=f"selfpatch-bench-{i}",
                    method="selfpatch" if i % 2 else "dino",
                    config=config,
                    config_hash="0" * 64,
                    launcher="local",
                    resources={},
                    status=Status.SUCCEEDED.value,
                    folder=str(folder),
                    output_dir=str(folder / "train"),
                    progress={"iteration": 300, "total_iterations": 300},
                    created_at=now - timedelta(seconds=count - i),
                )
            )
    db.dispose()
    return newest


def log_curve(tracking_uri: str, points: int) -> tuple[str, str]:
    """An MLflow run with `points` steps of train/loss; returns (experiment id, run id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("ui-bench")
    run = client.create_run(experiment, run_name="curve")
    stamp = int(time.time() * 1000)
    for start in range(0, points, 1000):
        batch = [
            Metric("train/loss", 7.0 / (1 + s / 1000) + 0.01 * (s % 7), stamp, s) for s in range(start, start + 1000)
        ]
        client.log_batch(run.info.run_id, metrics=batch)
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(experiment), str(run.info.run_id)


def timed(call: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return times, result


def row(name: str, times: list[float], size: int, baseline: float | str | None) -> str:
    """`baseline`: its median ms (a ratio), None (this row is the baseline) or a dash (no ratio applies)."""
    median = statistics.median(times) * 1000
    if isinstance(baseline, float):
        ratio = f"{baseline / median:.1f}x"
    else:
        ratio = "1.0x (baseline)" if baseline is None else baseline
    return f"| {name} | {median:.1f} | {max(times) * 1000:.1f} | {size / 1024:.0f} | {ratio} |"


def draw_times(raw: list[tuple[int, float]], downsampled: dict[str, list[Any]]) -> list[str] | None:
    chromium = shutil.which("chromium")
    if chromium is None:
        return None
    import plotly as plotly_pkg
    from playwright.sync_api import sync_playwright

    bundle = Path(plotly_pkg.__file__).parent / "package_data" / "plotly.min.js"
    script = """([xs, ys]) => { const d = document.createElement('div'); document.body.appendChild(d);
      const t0 = performance.now();
      return Plotly.newPlot(d, [{x: xs, y: ys, mode: 'lines', type: 'scattergl'}])
        .then(() => performance.now() - t0); }"""
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.set_content("<html><body></body></html>")
        page.add_script_tag(path=str(bundle))
        cases = [
            ("all points", [s for s, _ in raw], [v for _, v in raw]),
            ("downsampled", downsampled["steps"], downsampled["values"]),
        ]
        results = {}
        for name, xs, ys in cases:
            page.evaluate(script, [xs[:10], ys[:10]])  # warm-up: WebGL context and code paths
            results[name] = statistics.median(page.evaluate(script, [xs, ys]) for _ in range(3))
        browser.close()
    base = results["all points"]
    out.append(f"| draw all {len(raw):,} points (Plotly scattergl) | {base:.0f} | 1.0x (baseline) |")
    out.append(
        f"| draw {len(downsampled['steps']):,} downsampled points | {results['downsampled']:.0f} | "
        f"{base / max(results['downsampled'], 1e-9):.1f}x |"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ui-bench-") as tmp:
        root = Path(tmp)
        tracking = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
        (root / "mlruns").mkdir()
        settings = Settings(home=root / "home", admin_tokens=f"admin:{TOKEN}", mlflow_tracking_uri=tracking)
        app = create_app(settings)
        with TestClient(app) as client:  # migrates the database
            t0 = time.perf_counter()
            newest = seed_runs(settings.db_url, settings.home, args.runs)
            experiment_id, mlflow_run = log_curve(tracking, args.points)
            print(f"seeded {args.runs:,} runs and {args.points:,} metric points in {time.perf_counter() - t0:.0f} s")
            with Database(settings.db_url).transaction() as session:
                run = session.get(Run, newest)
                assert run is not None
                run.mlflow_run_id, run.mlflow_experiment_id = mlflow_run, experiment_id
            client.post("/login", data={"token": TOKEN, "next": "/"})

            lines = ["| request | median ms | max ms | KiB | speed-up vs baseline |", "|---|---:|---:|---:|---:|"]
            first_page = client.get("/")
            token = first_page.text.split("page_token=")[1].split('"')[0].replace("&amp;", "&")
            deep = f"/?page_token={token}"
            for _ in range(args.repeat // 2):  # walk to a deep page (page 10) through the cursors
                deep_page = client.get(deep).text
                if "page_token=" not in deep_page:
                    break
                deep = "/?page_token=" + deep_page.split("page_token=")[1].split('"')[0]

            pages.PAGE_SIZE = args.runs  # the baseline: every run on one page
            base_times, base = timed(lambda: client.get("/"), max(2, args.repeat // 10))
            pages.PAGE_SIZE = 50
            baseline = statistics.median(base_times) * 1000
            lines.append(row(f"run list, all {args.runs:,} runs on one page", base_times, len(base.content), None))
            times, resp = timed(lambda: client.get("/"), args.repeat)
            lines.append(row("run list, first page (50)", times, len(resp.content), baseline))
            times, resp = timed(lambda: client.get(deep), args.repeat)
            lines.append(row("run list, a deep page (cursor)", times, len(resp.content), baseline))
            times, resp = timed(lambda: client.get("/fragments/runs"), args.repeat)
            lines.append(row("run list, htmx refresh fragment", times, len(resp.content), baseline))

            from api.ui.charts import downsample
            from orchestrator.mlflow_bridge import MlflowBridge

            bridge = MlflowBridge(tracking)
            raw_times, raw = timed(
                lambda: json.dumps(bridge.metric_history(mlflow_run, "train/loss")), max(2, args.repeat // 10)
            )
            raw_points = bridge.metric_history(mlflow_run, "train/loss")
            raw_ms = statistics.median(raw_times) * 1000
            lines.append(row(f"curve, raw history ({len(raw_points):,} points, JSON)", raw_times, len(raw), None))
            path = f"/runs/{newest}/curves.json?key=train/loss"
            pages.CURVE_CACHE = type(pages.CURVE_CACHE)()
            first, resp = timed(lambda: client.get(path), 1)
            lines.append(row("curve, downsampled to 1,000 (first request)", first, len(resp.content), raw_ms))
            times, resp = timed(lambda: client.get(path), args.repeat)
            lines.append(row("curve, downsampled (cached, finished run)", times, len(resp.content), raw_ms))
            with Database(settings.db_url).transaction() as session:  # the same run, still training
                found = session.get(Run, newest)
                assert found is not None
                found.status = Status.RUNNING.value
            pages.CURVE_CACHE = type(pages.CURVE_CACHE)()
            client.get(path)  # the first view reads the whole history
            step = [args.points]

            def refresh() -> Any:
                from mlflow.entities import Metric

                stamp = int(time.time() * 1000)
                batch = [Metric("train/loss", 1.0, stamp, s) for s in range(step[0], step[0] + 100)]
                bridge.client.log_batch(mlflow_run, metrics=batch)
                step[0] += 100
                start = time.perf_counter()
                response = client.get(path)
                return time.perf_counter() - start, response

            measured = [refresh() for _ in range(args.repeat)]
            times = [t for t, _ in measured]
            lines.append(
                row("curve of a running run, refresh after +100 points", times, len(measured[-1][1].content), raw_ms)
            )
            times, _ = timed(lambda: client.get(f"/runs/{newest}"), args.repeat)
            size = len(client.get(f"/runs/{newest}").content)
            lines.append(row("run page HTML (curves load after)", times, size, "–"))
            print("\n".join(lines))
            drawn = draw_times(
                raw_points,
                {"steps": [s for s, _ in downsample(raw_points)], "values": [v for _, v in downsample(raw_points)]},
            )
            if drawn:
                print("\n| in the browser | median ms | speed-up |\n|---|---:|---:|")
                print("\n".join(drawn))
            else:
                print("\n(no chromium: the drawing rows were not measured)")


if __name__ == "__main__":
    main()
