"""The `orchestrator` command line: serve the service, submit and follow runs, export checkpoints.

Every command that reads state talks to the REST API (`--url`, `$ORCH_URL`) with a token: `--token` or
`$ORCH_TOKEN`, else the admin token a service with no configured tokens writes to `$ORCH_HOME/admin.token`,
else `~/.orchestrator/admin.token`.
`--output json` prints machine-readable JSON; a failure prints one line and exits non-zero.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar

import typer

from api.shell.client import DEFAULT_URL, ApiError, Client, find_token
from evaluator.config import BENCHMARKS

T = TypeVar("T")
app = typer.Typer(
    name="orchestrator",
    help="Run DINO / SelfPatch pretraining as a service: submit, follow, cancel, retry, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
runs_app = typer.Typer(help="List, show, follow, cancel and retry runs.", no_args_is_help=True)
ckpt_app = typer.Typer(help="Checkpoint tools.", no_args_is_help=True)
evals_app = typer.Typer(
    help="Evaluations of checkpoints: list, show, compare, run, retry, cancel.", no_args_is_help=True
)
app.add_typer(runs_app, name="runs")
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(evals_app, name="evals")
sweep_app = typer.Typer(
    help="Ablations (arms x paired seeds, with a statistical report) and hyper-parameter searches (Ray Tune with "
    "ASHA); resumable: create, list, status, report, cancel, retry.",
    no_args_is_help=True,
)
app.add_typer(sweep_app, name="sweep")

Url = Annotated[str, typer.Option("--url", envvar="ORCH_URL", help="Service URL.")]
Token = Annotated[str | None, typer.Option("--token", envvar="ORCH_TOKEN", help="Bearer token.", show_default=False)]
Output = Annotated[str, typer.Option("--output", "-o", help="text or json.")]
TERMINAL = {"succeeded", "failed", "cancelled"}


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def client(url: str, token: str | None) -> Client:
    found, source = find_token(token)
    return Client(url, found, token_source=source)


def call(url: str, token: str | None, action: Callable[[Client], T]) -> T:
    """One API call: its result, or a one-line error and exit code 2 (bad input) or 1 (anything else)."""
    with client(url, token) as api:
        try:
            return action(api)
        except ApiError as exc:
            fail(str(exc), 2 if exc.status in (400, 422) else 1)


def emit(data: Any, output: str, text: str) -> None:
    if output == "json":
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(text)


def run_line(run: dict[str, Any]) -> str:
    progress = run.get("progress") or {}
    done, total = progress.get("iteration"), progress.get("total_iterations")
    steps = f"{done}/{total}" if done is not None and total else "-"
    return f"{run['id']}  {run['status']:<10} {run['launcher']:<7} {steps:>11}  {run['name']}"


# ------------------------------------------------------------------------------------------- service


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    reconciler: Annotated[bool, typer.Option(help="Run the reconciler in this process.")] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level (warning hides the access log).")] = "info",
    log_format: Annotated[
        Literal["text", "json"] | None,
        typer.Option(
            help="text, or one JSON object per line with the request id and an access line per request "
            "(default: $ORCH_LOG_FORMAT, else text).",
        ),
    ] = None,
) -> None:
    """Run the REST API under /api/v1, the web UI at / (with MLflow's UI at /mlflow/) and, by default, the
    reconciler. Applies database migrations first. Log in to the UI with any REST token."""
    import uvicorn

    from api.main import create_app
    from api.observability import setup_logging
    from orchestrator.leader import DatabaseBusyError, claim_writer
    from orchestrator.settings import Settings

    overrides: dict[str, Any] = {"log_format": log_format} if log_format else {}
    settings = Settings(api_url=os.environ.get("ORCH_API_URL", f"http://{host}:{port}"), **overrides)
    logs = setup_logging(settings.log_format, log_level)
    try:
        claim = claim_writer(settings.db_url)  # SQLite: refuse here in one line, not in a startup traceback
    except DatabaseBusyError as exc:
        fail(str(exc))
    try:
        app = create_app(settings, run_reconciler=reconciler)
        # what start-up built (modules, the app) lives as long as the process: out of the collector's sight,
        # full collections under load scan only request garbage (a page's p99 at 100 requests/s: 47-74 -> 7 ms)
        gc.collect()
        gc.freeze()
        uvicorn.run(app, host=host, port=port, **logs)
    finally:
        claim.release()


@app.command()
def scheduler(
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve this process's Prometheus metrics (reconciler passes, jobs per state, queue depths, "
            "launcher errors) over HTTP on this port, without a token: for the scraper's network only.",
        ),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Bind address of --metrics-port.")] = "127.0.0.1",
) -> None:
    """Run the reconciler alone (when the API runs elsewhere, or several API replicas share one). On
    PostgreSQL several may run: one leads (an advisory lock), the others take over when it dies."""
    import logging
    import signal
    import threading

    from orchestrator.db.migrate import upgrade
    from orchestrator.db.session import Database
    from orchestrator.leader import DatabaseBusyError, open_lease
    from orchestrator.mlflow_bridge import MlflowBridge
    from orchestrator.reconciler import Reconciler
    from orchestrator.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    try:
        lease = open_lease(settings.db_url)  # PostgreSQL: several may run, one leads; SQLite: this one alone
    except DatabaseBusyError as exc:
        fail(str(exc))
    try:
        upgrade(settings.db_url)
        if metrics_port is not None:
            from api.observability import serve_metrics

            serve_metrics(metrics_host, metrics_port)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        reconciler = Reconciler(settings, Database(settings.db_url), mlflow=MlflowBridge(settings.tracking_uri))
        with contextlib.suppress(KeyboardInterrupt):
            reconciler.run_forever(stop, lease)
    finally:
        lease.release()


# ------------------------------------------------------------------------------------------- submit


def submission(
    config: str,
    overrides: list[str],
    experiment: str,
    name: str | None,
    launcher: str | None,
    resources: dict[str, Any],
) -> dict[str, Any]:
    body: dict[str, Any] = {"experiment": experiment, "overrides": overrides, "resources": resources}
    path = Path(config)
    if path.suffix in (".yaml", ".yml") and path.exists():  # a local file: send it resolved
        from trainer.presets import ConfigError, load_config

        try:
            body["config"] = load_config(path, []).model_dump(mode="json")
        except ConfigError as exc:
            fail(str(exc), 2)
    else:
        body["preset"] = config
    if name:
        body["name"] = name
    if launcher:
        body["launcher"] = launcher
    return body


@app.command()
def submit(
    config: Annotated[str, typer.Argument(help="Preset name (configs/*.yaml) or a YAML file.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides: selfpatch.k=4 optim.epochs=10")
    ] = None,
    experiment: Annotated[str, typer.Option(help="Experiment (created if new).")] = "default",
    name: Annotated[str | None, typer.Option(help="Run name.")] = None,
    launcher: Annotated[str | None, typer.Option(help="local, slurm, ray or dryrun.")] = None,
    nodes: Annotated[int, typer.Option(help="Nodes.")] = 1,
    gpus: Annotated[int, typer.Option(help="GPUs per node.")] = 0,
    cpus: Annotated[int, typer.Option(help="CPU cores per task.")] = 2,
    mem_gb: Annotated[float, typer.Option(help="Memory per node (GiB).")] = 4.0,
    time_min: Annotated[int, typer.Option(help="Wall-time limit (minutes).")] = 60,
    partition: Annotated[str | None, typer.Option(help="SLURM partition.")] = None,
    account: Annotated[str | None, typer.Option(help="SLURM account.")] = None,
    qos: Annotated[str | None, typer.Option(help="SLURM QoS.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Render the submission; change nothing.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow the run until it ends.")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="Safe retries: same key, same run.")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    output: Output = "text",
) -> None:
    """Submit a pretraining run. Returns at once (202 queued) unless --follow."""
    resources: dict[str, Any] = {
        "nodes": nodes,
        "gpus_per_node": gpus,
        "cpus_per_task": cpus,
        "mem_gb": mem_gb,
        "time_min": time_min,
    }
    for key, value in (("partition", partition), ("account", account), ("qos", qos)):
        if value:
            resources[key] = value
    body = submission(config, overrides or [], experiment, name, launcher, resources)
    result = call(url, token, lambda api: api.submit(body, dry_run=dry_run, idempotency_key=idempotency_key))
    if dry_run:
        rendered = f"# launcher: {result['launcher']}  config_hash: {result['config_hash']}\n{result['rendered']}"
        emit(result, output, rendered)
        return
    emit(result, output, f"submitted {result['id']} ({result['name']}), status {result['status']}")
    if follow:
        final = call(url, token, lambda api: follow_run(api, result["id"], quiet=output == "json"))
        if output == "json":
            emit(final, output, "")
        if final["status"] != "succeeded":
            raise typer.Exit(1)


def follow_run(api: Client, run_id: str, quiet: bool = False, poll_s: float = 2.0) -> dict[str, Any]:
    """A live progress line until the run is terminal, then until the evaluations it triggered are; returns
    the final run with its `evaluations`."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, quiet=quiet)
    with Progress(
        TextColumn("[bold]{task.fields[status]:<10}"),
        BarColumn(),
        TextColumn("{task.fields[steps]:>13}"),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("run", total=None, status="queued", steps="waiting", loss="")
        while True:
            run = _poll(lambda: api.run(run_id), poll_s)
            info = run.get("progress") or {}
            total, done = info.get("total_iterations"), info.get("iteration") or 0
            metrics = info.get("metrics") or {}
            progress.update(
                task,
                total=total,
                completed=done,
                status=run["status"],
                steps=f"{done}/{total} steps" if total else "waiting",
                loss=f"loss {metrics['train/loss']:.4f}" if "train/loss" in metrics else "",
            )
            if run["status"] in TERMINAL:
                break
            time.sleep(poll_s)
        evaluations = _follow_evaluations(api, run_id, progress, poll_s) if run["status"] == "succeeded" else []
    if not quiet:
        console.print(f"{run['status']}: {run.get('status_reason') or ''}")
        for c in api.checkpoints(run_id):
            console.print(f"  checkpoint {c['id']}  epoch {c['epoch']:>3} step {c['step']:>6}  {c['path']}")
        for e in evaluations:
            console.print(f"  evaluation {eval_line(e)}")
        if run.get("mlflow_url"):
            console.print(f"  MLflow: {run['mlflow_url']}")
        elif run.get("mlflow_run_id"):
            console.print(f"  MLflow run id: {run['mlflow_run_id']}")
    return {**run, "evaluations": evaluations}


def _poll(read: Callable[[], T], poll_s: float) -> T:
    """Read through a service restart: an unreachable service is retried, any other error is raised."""
    while True:
        try:
            return read()
        except ApiError as exc:
            if exc.status != 0:
                raise
            time.sleep(poll_s)


def _follow_evaluations(api: Client, run_id: str, progress: Any, poll_s: float) -> list[dict[str, Any]]:
    """The evaluations the run's checkpoints triggered, followed until every one has ended."""
    task = progress.add_task("evaluations", total=None, status="evals", steps="", loss="")
    while True:
        evaluations: list[dict[str, Any]] = _poll(lambda: api.run_evaluations(run_id), poll_s)
        ended = sum(e["status"] in TERMINAL for e in evaluations)
        progress.update(task, total=len(evaluations) or None, completed=ended, steps=f"{ended}/{len(evaluations)} done")
        if ended == len(evaluations):
            return evaluations
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------- runs


@runs_app.command("list")
def runs_list(
    status: Annotated[list[str] | None, typer.Option(help="Filter by status (repeatable).")] = None,
    experiment: Annotated[str | None, typer.Option(help="Filter by experiment.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    url: Url = DEFAULT_URL,
    token: Token = None,
    output: Output = "text",
) -> None:
    """Runs, newest first."""
    page = call(url, token, lambda api: api.runs(page_size=limit, status=status, experiment=experiment))
    emit(page, output, "\n".join(run_line(r) for r in page["items"]) or "no runs")


@runs_app.command("show")
def runs_show(run_id: str, url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """One run with its attempts and checkpoints."""
    run = call(
        url,
        token,
        lambda api: {
            **api.run(run_id),
            "checkpoints": api.checkpoints(run_id),
            "evaluations": api.run_evaluations(run_id),
        },
    )
    lines = [run_line(run), f"  reason: {run.get('status_reason')}", f"  config hash: {run['config_hash']}"]
    lines += [
        f"  attempt {a['number']}: {a['backend']} job {a['backend_job_id']} {a['state']} "
        f"host={a['host']} exit={a['exit_code']} {a['exit_reason'] or ''}"
        for a in run["attempts"]
    ]
    lines += [f"  checkpoint {c['id']}  epoch {c['epoch']} step {c['step']} {c['path']}" for c in run["checkpoints"]]
    lines += [f"  evaluation {eval_line(e)}" for e in run["evaluations"]]
    if run.get("mlflow_url") or run.get("mlflow_run_id"):
        lines.append(f"  MLflow: {run.get('mlflow_url') or run['mlflow_run_id']}")
    emit(run, output, "\n".join(lines))


@runs_app.command("logs")
def runs_logs(
    run_id: str,
    tail: Annotated[int, typer.Option(help="Lines.")] = 200,
    url: Url = DEFAULT_URL,
    token: Token = None,
    output: Output = "text",
) -> None:
    """Tail of the latest attempt's log."""
    text = call(url, token, lambda api: api.logs(run_id, tail))
    emit({"run_id": run_id, "log": text}, output, text.rstrip("\n"))


@runs_app.command("cancel")
def runs_cancel(run_id: str, url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """Cancel a run (its job is stopped)."""
    run = call(url, token, lambda api: api.cancel(run_id))
    emit(run, output, f"{run['id']} {run['status']}")


@runs_app.command("retry")
def runs_retry(run_id: str, url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """Submit a finished run again as a new run with the same config."""
    run = call(url, token, lambda api: api.retry(run_id))
    emit(run, output, f"submitted {run['id']} (retry of {run_id}), status {run['status']}")


@runs_app.command("follow")
def runs_follow(run_id: str, url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """Follow a run until it ends; exit code 0 only if it succeeded."""
    final = call(url, token, lambda api: follow_run(api, run_id, quiet=output == "json"))
    if output == "json":
        emit(final, output, "")
    if final["status"] != "succeeded":
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------- checkpoints


@ckpt_app.command("export")
def ckpt_export(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint (.pth).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the exports and manifest.json.")],
    formats: Annotated[
        str, typer.Option(help="Comma-separated: torch,safetensors,mm,dino,aggregation (SelfPatch).")
    ] = "torch,safetensors,mm,dino,aggregation",
    output: Output = "text",
) -> None:
    """Export the teacher backbone (timm, safetensors, mmdet/mmseg, DINO-eval), each verified by a strict load."""
    from trainer.checkpoint import CheckpointError
    from trainer.export import export_checkpoint

    try:
        manifest = export_checkpoint(checkpoint, out_dir, tuple(f for f in formats.split(",") if f))
    except (CheckpointError, ValueError) as exc:
        fail(str(exc), 2)
    lines = [f"{fmt:12s} {out_dir / e['path']}  sha256={e['sha256'][:16]}" for fmt, e in manifest["files"].items()]
    emit(manifest, output, "\n".join([*lines, f"manifest     {out_dir / 'manifest.json'}"]))


# ------------------------------------------------------------------------------------------- evaluations


def eval_line(e: dict[str, Any]) -> str:
    headlines = ("top1_k20", "top1", "bbox_AP", "mIoU")
    headline = next((f"{k}={v:.2f}" for k, v in e["metrics"].items() if k.endswith(headlines)), "")
    where = f"{e['benchmark']:<6} v{e['benchmark_version']} epoch {e['checkpoint_epoch']:>3}"
    return f"{e['id']}  {e['status']:<9} {where}  {headline}  {e['error'] or ''}".rstrip()


@evals_app.command("list")
def evals_list(
    run: Annotated[str | None, typer.Option(help="Only this run's evaluations.")] = None,
    benchmark: Annotated[str | None, typer.Option(help=f"One of {', '.join(BENCHMARKS)}.")] = None,
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed, ...")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    url: Url = DEFAULT_URL,
    token: Token = None,
    output: Output = "text",
) -> None:
    """Evaluations, newest first."""
    page = call(
        url, token, lambda api: api.evaluations(run_id=run, benchmark=benchmark, status=status, page_size=limit)
    )
    emit(page, output, "\n".join(eval_line(e) for e in page["items"]) or "no evaluations")


@evals_app.command("show")
def evals_show(evaluation_id: str, url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """One evaluation with all its metrics."""
    evaluation = call(url, token, lambda api: api.evaluation(evaluation_id))
    lines = [
        eval_line(evaluation),
        f"  checkpoint {evaluation['checkpoint_sha256'][:16]} "
        f"(epoch {evaluation['checkpoint_epoch']}, step {evaluation['checkpoint_step']})",
        f"  config {evaluation['config_name']} {evaluation['config_hash'][:12]}  data {evaluation['dataset']}",
    ]
    lines += [f"  {name:<28} {value:8.3f}" for name, value in sorted(evaluation["metrics"].items())]
    emit(evaluation, output, "\n".join(lines))


@evals_app.command("compare")
def evals_compare(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoint ids to put side by side.")],
    url: Url = DEFAULT_URL,
    token: Token = None,
    output: Output = "text",
) -> None:
    """Metrics of several checkpoints side by side (a rich table)."""
    table = call(url, token, lambda api: api.compare(checkpoints))
    if output == "json":
        emit(table, output, "")
        return
    from rich.console import Console
    from rich.table import Table

    view = Table(title="evaluations side by side")
    view.add_column("metric")
    for c in table["checkpoints"]:
        view.add_column(f"epoch {c['epoch']}\n{c['id'][:8]}", justify="right")
    for name, values in table["metrics"].items():
        view.add_row(
            name, *("-" if values[c["id"]] is None else f"{values[c['id']]:.2f}" for c in table["checkpoints"])
        )
    Console().print(view)


@evals_app.command("run")
def evals_run(
    checkpoint_id: Annotated[str, typer.Argument(help="A recorded checkpoint's id (runs show lists them).")],
    benchmark: Annotated[str, typer.Option(help=f"One of {', '.join(BENCHMARKS)}.")],
    data: Annotated[str, typer.Option(help="Dataset root.")],
    config: Annotated[str, typer.Option(help="tiny or full.")] = "tiny",
    launcher: Annotated[str | None, typer.Option(help="local, slurm, ray.")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    output: Output = "text",
) -> None:
    """Evaluate a checkpoint now; an identical evaluation is reused, not recomputed."""
    body: dict[str, Any] = {"benchmark": benchmark, "data": data, "config": config}
    if launcher:
        body["launcher"] = launcher
    evaluation = call(url, token, lambda api: api.evaluate(checkpoint_id, body))
    emit(evaluation, output, eval_line(evaluation))


@evals_app.command("retry")
def evals_retry(evaluation_id: str, url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """Evaluate again after a failure or a cancel: a new evaluation linked to the old one."""
    evaluation = call(url, token, lambda api: api.retry_evaluation(evaluation_id))
    emit(evaluation, output, eval_line(evaluation))


@evals_app.command("cancel")
def evals_cancel(evaluation_id: str, url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """Cancel an evaluation (its job is stopped)."""
    evaluation = call(url, token, lambda api: api.cancel_evaluation(evaluation_id))
    emit(evaluation, output, eval_line(evaluation))


# ------------------------------------------------------------------------------------------- sweeps


def sweep_file_path(path: str) -> Path:
    """A sweep file on disk, or the preset of that name (configs/sweeps/NAME.yaml)."""
    from trainer.presets import preset_dir

    candidate = Path(path)
    if not candidate.is_file():
        candidate = preset_dir() / "sweeps" / f"{path.removesuffix('.yaml')}.yaml"
    if not candidate.is_file():
        fail(f"no sweep file {path!r} (nor a preset configs/sweeps/{path}.yaml)", 2)
    return candidate


def read_sweep_file(path: str) -> dict[str, Any]:
    """A sweep file from disk, or a preset name (configs/sweeps/NAME.yaml) the client resolves."""
    import yaml

    from trainer.presets import parse_yaml

    candidate = sweep_file_path(path)
    try:
        data = parse_yaml(candidate.read_text())
    except (yaml.YAMLError, ValueError) as exc:
        fail(f"{candidate}: invalid YAML: {str(exc).splitlines()[0]}", 2)
    if not isinstance(data, dict):
        fail(f"{candidate}: a sweep file is a mapping", 2)
    result: dict[str, Any] = data
    return result


def sweep_line(sweep: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(sweep["counts"].items()))
    budget = f" of {sweep['budget_hours']:g}" if sweep.get("budget_hours") else ""
    return (
        f"{sweep['id']}  {sweep['status']:<9} {sweep['name']}  [{counts}]  "
        f"{sweep['accelerator_hours']:.2f}{budget} accelerator-hours"
    )


@sweep_app.command("create")
def sweep_create(
    file: Annotated[str, typer.Argument(help="A sweep YAML file, or a preset name (configs/sweeps/).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show trials, one submission and the cost.")] = False,
    extend: Annotated[bool, typer.Option("--extend", help="Add the arms or seeds the file adds.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow the sweep, then print its report.")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
    output: Output = "text",
) -> None:
    """Create a sweep; safe to run again (nothing is duplicated, missing trials are added)."""
    spec = read_sweep_file(file)
    result = call(url, token, lambda api: api.create_sweep(spec, dry_run=dry_run, extend=extend))
    if dry_run:
        emit(result, output, plan_text(result))
        return
    sweep = result["sweep"]
    verb = "created" if result["created"] else f"exists ({result['added']} trials added)"
    emit(result, output, f"sweep {sweep['name']} {verb}\n{sweep_line(sweep)}")
    if follow:
        final = call(url, token, lambda api: follow_sweep(api, sweep["id"], quiet=output == "json"))
        if output != "json":
            typer.echo(call(url, token, lambda api: api.sweep_report(sweep["id"], "markdown")))
        if final["status"] != "completed":
            raise typer.Exit(1)


def plan_text(plan: dict[str, Any]) -> str:
    if plan.get("search"):
        return "\n".join(
            [
                f"sweep {plan['name']}  spec {plan['spec_hash'][:12]}  exists: {plan['exists']}",
                plan["search"],
                f"at most about {plan['estimate_hours']:.1f} hours and {plan['estimate_accelerator_hours']:.1f} "
                f"accelerator-hours if no trial stops early ({plan['assumption']})",
                "the search job's submission:",
                plan["rendered"],
            ]
        )
    lines = [
        f"sweep {plan['name']}  spec {plan['spec_hash'][:12]}  exists: {plan['exists']}",
        f"{'arm':<28} {'seed':>4}  {'config hash':<14} {'hours':>8} {'acc-hours':>9}",
    ]
    lines += [
        f"{t['arm'][:28]:<28} {t['seed']:>4}  {t['config_hash'][:12]:<14} "
        f"{t['hours']:>8.2f} {t['accelerator_hours']:>9.2f}"
        for t in plan["trials"]
    ]
    lines += [
        f"{len(plan['trials'])} trials, about {plan['estimate_hours']:.1f} hours and "
        f"{plan['estimate_accelerator_hours']:.1f} accelerator-hours ({plan['assumption']})",
        "first trial's submission:",
        plan["rendered"],
    ]
    return "\n".join(lines)


def follow_sweep(api: Client, ident: str, quiet: bool = False, poll_s: float = 3.0) -> dict[str, Any]:
    """Trial counts as they change until the sweep is completed or cancelled."""
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    with console.status("following the sweep") as status:
        while True:
            sweep: dict[str, Any] = _poll(lambda: api.sweep(ident), poll_s)
            status.update(sweep_line(sweep))
            if sweep["status"] in ("completed", "cancelled"):
                console.print(sweep_line(sweep))
                return sweep
            time.sleep(poll_s)


@sweep_app.command("list")
def sweep_list(url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """Sweeps, newest first."""
    page = call(url, token, lambda api: api.sweeps())
    emit(page, output, "\n".join(sweep_line(s) for s in page["items"]) or "no sweeps")


@sweep_app.command("status")
def sweep_status(ident: str, url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """A sweep's arm x seed matrix: status and primary metric of every trial."""
    sweep = call(url, token, lambda api: api.sweep(ident))
    lines = [sweep_line(sweep), f"  baseline {sweep['baseline'] or '-'}, primary {sweep['primary_metric']}"]
    if sweep.get("search"):
        search = sweep["search"]
        lines.append(f"  search job {search['id']}  {search['status']}  attempts {len(search['attempts'])}")
    for cell in sweep["trials"]:
        value = "-" if cell["primary"] is None else f"{cell['primary']:.2f}"
        lines.append(f"  {cell['arm']:<28} seed {cell['seed']:>3}  {cell['status']:<10} {value:>8}  {cell['run_id']}")
    emit(sweep, output, "\n".join(lines))


@sweep_app.command("report")
def sweep_report(
    ident: str,
    format: Annotated[str, typer.Option("--format", help="table, markdown, json or csv.")] = "table",
    plots: Annotated[Path | None, typer.Option(help="Also save the plots (PNG and SVG) into this folder.")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """The report: per arm mean and 95% CI, paired differences vs the baseline, Holm-adjusted p, cost (for a
    search: the trials ranked by their objective, with their values and why each ended)."""
    if format not in ("table", "markdown", "json", "csv"):
        fail(f"--format {format!r}: use table, markdown, json or csv", 2)
    wire = {"table": "markdown"}.get(format, format)
    text = call(url, token, lambda api: api.sweep_report(ident, wire))
    if format == "table":
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(text))
    else:
        typer.echo(json.dumps(text, indent=2) if format == "json" else text)
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        names = call(url, token, lambda api: api.sweep(ident))["plots"]
        for name in (f"{stem}.{fmt}" for stem in names for fmt in ("png", "svg")):

            def fetch(api: Client, name: str = name) -> bytes:
                return api.sweep_plot(ident, name)

            (plots / name).write_bytes(call(url, token, fetch))
        typer.echo(f"plots in {plots}", err=True)


@sweep_app.command("cancel")
def sweep_cancel(ident: str, url: Url = DEFAULT_URL, token: Token = None, output: Output = "text") -> None:
    """Cancel a sweep: its trials stop."""
    sweep = call(url, token, lambda api: api.cancel_sweep(ident))
    emit(sweep, output, sweep_line(sweep))


@sweep_app.command("retry")
def sweep_retry(
    ident: str,
    failed: Annotated[bool, typer.Option("--failed", help="Retry the trials that failed or were cancelled.")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
    output: Output = "text",
) -> None:
    """Retry a sweep's failed trials (a new trial for each such arm and seed)."""
    if not failed:
        fail("say what to retry: --failed", 2)
    sweep = call(url, token, lambda api: api.retry_sweep(ident))
    emit(sweep, output, sweep_line(sweep))


# ------------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="Preset to run.")] = "tiny_cpu",
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides.")] = None,
    port: Annotated[int, typer.Option(help="Port of the embedded service.")] = 8000,
    stay: Annotated[bool, typer.Option(help="Keep serving the web UI after the run ends (Ctrl-C stops).")] = False,
) -> None:
    """The whole loop on the embedded default: start the service (SQLite, local launcher, local MLflow),
    submit a run over REST, follow it to the end, print its checkpoints and MLflow link, stop.

    While it runs, the web UI is at the printed URL (log in with the printed token) and MLflow's UI at /mlflow/."""
    import logging

    from api.shell.embedded import EmbeddedService

    for noisy in ("mlflow", "alembic", "httpx"):  # their INFO lines would break the progress display
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with EmbeddedService(port=port) as service:
        typer.echo(
            f"service {service.url} (database {service.settings.db_url}, MLflow {service.settings.tracking_uri})\n"
            f"while it runs: ORCH_URL={service.url} ORCH_HOME={service.settings.home} orchestrator runs list\n"
            f"web UI: {service.url}/ (log in with the admin token {service.token}); MLflow UI: {service.url}/mlflow/"
        )
        with Client(service.url, service.token) as api:
            run = api.submit(
                {"experiment": "demo", "preset": preset, "overrides": overrides or [], "launcher": "local"}
            )
            typer.echo(f"submitted run {run['id']} ({run['name']})")
            final = follow_run(api, run["id"])
            typer.echo(f"see it: {service.url}/runs/{run['id']}")
            if stay:
                typer.echo("serving the web UI until Ctrl-C")
                with contextlib.suppress(KeyboardInterrupt):
                    threading.Event().wait()
    typer.echo(f"browse it later: mlflow ui --backend-store-uri {service.settings.tracking_uri}")
    if final["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def study(
    file: Annotated[str, typer.Argument(help="A sweep YAML file, or a preset name (configs/sweeps/).")],
    out: Annotated[Path | None, typer.Option(help="Evidence folder (default results/<sweep file stem>).")] = None,
    home: Annotated[
        Path | None, typer.Option(help="Service state (default outputs/studies/<stem>); kept, so a rerun resumes.")
    ] = None,
    floors: Annotated[bool, typer.Option(help="Also measure the random-backbone and raw-pixel floors.")] = True,
    port: Annotated[int, typer.Option(help="Port of the embedded service.")] = 8000,
) -> None:
    """Run a sweep to the end on the embedded service and write its evidence: report (Markdown, JSON, CSV),
    plots, the exact sweep file, floors, code commit and wall time. Rerunning resumes the same sweep."""
    import logging

    from api.shell.embedded import EmbeddedService
    from api.shell.study import write_study
    from orchestrator.settings import Settings

    started = time.time()
    spec = read_sweep_file(file)
    source = sweep_file_path(file)
    stem = source.stem
    for noisy in ("mlflow", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings(home=(home or Path("outputs") / "studies" / stem).resolve())
    target = out or Path("results") / stem
    with EmbeddedService(settings, port=port) as service:
        typer.echo(f"service {service.url} (state in {settings.home}; rerun the same command to resume)")
        with Client(service.url, service.token) as api:
            try:
                record = write_study(api, source, spec, target, started, typer.echo, follow_sweep, floors)
            except ApiError as exc:
                fail(f"{exc}", 1)
    typer.echo((target / "report.md").read_text())
    typer.echo(f"evidence in {target} ({record.wall_s / 60:.1f} min)")


@app.command("study-pool")
def study_pool(
    folders: Annotated[
        list[Path], typer.Argument(help="Two or more finished studies' evidence folders (results/<name>).")
    ],
    out: Annotated[Path, typer.Option(help="The pooled evidence folder (replaced if it exists).")],
    name: Annotated[str | None, typer.Option(help="The pooled study's name (default <first sweep>-pooled).")] = None,
) -> None:
    """Analyse several studies of one ablation with disjoint seeds as one: the sweep files must differ only
    in their seeds. Writes the report (Markdown, JSON, CSV), the plots, the pooled sweep file and pool.json
    (each part's commit, the code that differs between them, whether their floors agree)."""
    from api.shell.study_pool import pool_studies

    try:
        record = pool_studies(folders, out, name)
    except ValueError as exc:
        fail(str(exc), 2)
    typer.echo((out / "report.md").read_text())
    seeds = ", ".join(str(s) for s in record.seeds)
    typer.echo(f"pooled {len(record.sources)} studies (seeds {seeds}) into {out}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
