"""Job side of a search: one Ray Tune experiment whose trials are runs of the sweep.

Payload: sweep_id, sweep_name, search (the sweep file's `search`), metric and mode (the sweep's primary
metric), epochs (ASHA's maximum), max_concurrent, trials_path (where trials register), tune_dir (the
experiment's folder, shared by every attempt and retry of the sweep's search), monitor (the benchmark run at
each epoch end, resolved: benchmark, config, dataset) or None.

The first attempt builds a `Tuner`; any later one (the job was lost, failed or preempted, or the sweep was
retried) finds the experiment in `tune_dir` and continues it with `Tuner.restore`: trials that ended stay
ended, unfinished ones resume from their own checkpoints. SIGTERM ends the attempt as interrupted (requeued).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from orchestrator.jobs.files import (
    EXIT_BAD_JOB,
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    JobFile,
    lacks_payload,
    write_result,
)
from orchestrator.jobs.reporter import Reporter

log = logging.getLogger("orchestrator.jobs")
PAYLOAD = ("sweep_id", "sweep_name", "search", "metric", "mode", "epochs", "trials_path", "tune_dir")
EXPERIMENT = "tune"
#: ASHA's rungs, beside the experiment: Tune does not save a scheduler's state, a restore needs them.
RUNGS_FILE = "asha-rungs.json"


def tune_domain(dimension: Any) -> Any:
    """A search-space dimension as Ray Tune's sampling domain."""
    from ray import tune

    if dimension.grid is not None:
        return tune.grid_search(list(dimension.grid))
    if dimension.choice is not None:
        return tune.choice(list(dimension.choice))
    if dimension.uniform is not None:
        return tune.uniform(*dimension.uniform)
    if dimension.loguniform is not None:
        return tune.loguniform(*dimension.loguniform)
    return tune.randint(*dimension.randint)


def search_algorithm(search: Any, metric: str, mode: str) -> Any:
    """Tune's random/grid sampler, or Optuna's TPE, with the search's seed (reproducible suggestions)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if search.algorithm == "random":
        return BasicVariantGenerator(random_state=search.seed)
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=search.seed), max_concurrent=4)


def run(job: JobFile, folder: Path, attempt: int, heartbeat_s: float = 15.0) -> int:
    from ray import tune

    from orchestrator.jobs.tune_trial import TRIAL_METRIC, ExplainedASHA, SearchContext, TrialTrainable
    from orchestrator.sweeps.spec import Search

    payload = job.payload
    if lacks_payload(job, folder, attempt, PAYLOAD):
        return EXIT_BAD_JOB
    search = Search.model_validate(payload["search"])
    epochs, mode = int(payload["epochs"]), str(payload["mode"])
    context = SearchContext(
        trials_url=f"{job.api_url.rstrip('/')}{payload['trials_path']}",
        token=job.token,
        metric=str(payload["metric"]),
        epochs=epochs,
        monitor=payload.get("monitor"),
    )

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # Tune saves the experiment and stops its trials at a checkpoint

    signal.signal(signal.SIGTERM, interrupt)
    reporter = Reporter(job, attempt)
    reporter.start()
    stop = reporter.beat_every(heartbeat_s)
    path = Path(str(payload["tune_dir"])) / EXPERIMENT
    trainable = tune.with_resources(
        tune.with_parameters(TrialTrainable, context=context), {"cpu": search.trial_cpus, "gpu": search.trial_gpus}
    )
    try:
        if tune.Tuner.can_restore(str(path)):
            log.info("restoring the Tune experiment in %s", path)
            reporter.send("heartbeat", metrics={})
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler: Any = None
            if search.scheduler == "asha":
                scheduler = ExplainedASHA(
                    time_attr="epoch",
                    max_t=epochs,
                    grace_period=min(search.asha.grace_period, epochs),
                    reduction_factor=search.asha.reduction_factor,
                    primary=context.metric,
                    rungs_path=str(path.parent / RUNGS_FILE),
                )
            tuner = tune.Tuner(
                trainable,
                param_space={key: tune_domain(dim) for key, dim in search.space.items()},
                tune_config=tune.TuneConfig(
                    metric=TRIAL_METRIC,
                    mode=mode,
                    search_alg=search_algorithm(search, TRIAL_METRIC, mode),
                    scheduler=scheduler,
                    num_samples=search.num_samples,
                    max_concurrent_trials=int(payload.get("max_concurrent") or 1),
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(path.parent),
                    failure_config=tune.FailureConfig(max_failures=0),  # a failed trial run stays failed
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_frequency=1),
                    verbose=1,
                ),
            )
        results = tuner.fit()
    except KeyboardInterrupt:
        write_result(folder, attempt, "interrupted", reason="stopped (SIGTERM): the next attempt restores it")
        reporter.send("end", status="interrupted")
        return reporter.finish(stop, EXIT_INTERRUPTED)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        write_result(folder, attempt, "failed", reason=reason)
        reporter.send("end", status="failed", reason=reason)
        return reporter.finish(stop, EXIT_FAILED)
    errors = sum(1 for i in range(len(results)) if results[i].error is not None)
    metrics: dict[str, float] = {"trials": float(len(results)), "errored_trials": float(errors)}
    try:
        best = results.get_best_result(TRIAL_METRIC, mode, scope="last")
        if best.metrics and TRIAL_METRIC in best.metrics:
            metrics["best"] = float(best.metrics[TRIAL_METRIC])
    except RuntimeError:  # no trial reported the metric
        pass
    write_result(folder, attempt, "completed", metrics=metrics)
    reporter.send("end", status="completed")
    return reporter.finish(stop, EXIT_COMPLETED)
