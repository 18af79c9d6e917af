"""A run's final export in MLflow: its files as artifacts, its checkpoints as links, its backbone in the Model
Registry; and the evaluation metrics of that backbone as tags of its model version.

* Artifacts: every file of the export folder that the manifest lists, and the manifest, under `export/` of the
  run, byte for byte what `<output_dir>/export/` holds. Checkpoints are large and stay in the run folder: the
  run's `checkpoints.json` artifact lists their paths (with sha256, epoch and size), the tag
  `orch.checkpoint_dir` names the folder.
* Registry: one registered model per experiment and method (`registered_model_name`), one version per run whose
  source is `runs:/<run_id>/export`, tagged with the config hash, method, arch and the sha256 of the checkpoint
  the export was made from (`orch.ckpt_sha256`, what evaluations are matched by).
* Evaluation metrics: an evaluation of that same checkpoint sets `eval/<benchmark>/<metric>` tags on the version.
  Either side may come second (an evaluation planned on the last numbered checkpoint can finish before the run
  has exported), so each side looks for the other after writing its own: the evaluation tags versions that exist
  once its child run is FINISHED, and a new version copies the metrics of the FINISHED evaluation child runs.

Torch-free (the evaluation job runner imports it); the caller brings the `MlflowClient`.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.files import MANIFEST

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

#: Where the export's files go among the run's artifacts (and what a model version's source points at).
EXPORT_ARTIFACTS = "export"
#: The run artifact that links the run folder's checkpoints instead of copying them.
CHECKPOINT_LINKS = "checkpoints.json"
#: The tag (model versions, evaluation child runs) holding the sha256 of the checkpoint behind them.
CKPT_TAG = "orch.ckpt_sha256"
#: Evaluation metrics are named `eval/<benchmark>/<metric>` in child runs and in model version tags alike.
EVAL_PREFIX = "eval/"
#: MLflow keeps registered model names in a 256-character column; leave room.
MAX_NAME = 200


def registered_model_name(experiment: str, method: str) -> str:
    """`<experiment>-<method>` lower-cased, each run of characters other than `a-z 0-9 . _ -` made one `-` (MLflow
    refuses `/` and `:` in names): 'composites/paper_core' + 'selfpatch' -> 'composites-paper_core-selfpatch'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", f"{experiment}-{method}".lower()).strip("-.")
    return name[:MAX_NAME].rstrip("-.") or method


def log_export(
    client: MlflowClient,
    run_id: str,
    export_dir: Path,
    checkpoints: list[dict[str, Any]],
    output_dir: Path,
    *,
    files: bool = True,
) -> dict[str, Any]:
    """Log the export under `export/` (only its manifest when `files` is false) and link the checkpoints; return
    the manifest. Each file is logged on its own: the folder may hold stray temporary files of a crashed writer."""
    manifest: dict[str, Any] = json.loads((export_dir / MANIFEST).read_text())
    if files:
        for entry in manifest["files"].values():
            client.log_artifact(run_id, str(export_dir / entry["path"]), EXPORT_ARTIFACTS)
    client.log_artifact(run_id, str(export_dir / MANIFEST), EXPORT_ARTIFACTS)
    links = {
        "linked_not_copied": "training checkpoints stay in the run folder on the host that trained",
        "host": socket.gethostname(),
        "folder": str(output_dir.resolve()),
        "checkpoints": checkpoints,
    }
    client.log_dict(run_id, links, CHECKPOINT_LINKS)
    client.set_tag(run_id, "orch.checkpoint_dir", str(output_dir.resolve()))
    return manifest


def checkpoint_links(log_file: Path) -> list[dict[str, Any]]:
    """The checkpoints the trainer's log.jsonl recorded that are still on disk, by the last record of each path
    (checkpoint.pth is rewritten): path, epoch, iteration, kind, sha256 and size."""
    latest: dict[str, dict[str, Any]] = {}
    if log_file.is_file():
        for line in log_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and record.get("event") == "checkpoint" and record.get("path"):
                latest[str(record["path"])] = record
    links = []
    for path, record in sorted(latest.items()):
        file = Path(path)
        if file.is_file():
            known = {k: record.get(k) for k in ("epoch", "iteration", "kind", "sha256")}
            links.append({"path": str(file.resolve()), **known, "bytes": file.stat().st_size})
    return links


def ensure_registered_model(client: MlflowClient, name: str, experiment: str, method: str) -> None:
    """Create the registered model unless it exists; two runs creating it at once both go on (one gets
    RESOURCE_ALREADY_EXISTS, which is the outcome it wanted)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={"orch.experiment": experiment, "method": method},
            description=(
                f"Final {method} backbones of the experiment {experiment!r}: one version per run, its files in the "
                f"run's {EXPORT_ARTIFACTS}/ artifacts ({MANIFEST} says how to load them)."
            ),
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_export(
    client: MlflowClient,
    run_id: str,
    experiment: str,
    manifest: Mapping[str, Any],
    extra_tags: Mapping[str, str] | None = None,
) -> ModelVersion:
    """The model version of this run's export: created once (a requeued attempt that exports again finds it),
    with the metrics of evaluations of its checkpoint that finished before it existed."""
    method, sha = str(manifest["method"]), str(manifest["source_checkpoint"]["sha256"])
    name = registered_model_name(experiment, method)
    ensure_registered_model(client, name, experiment, method)
    mine = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    existing = [v for v in mine if v.tags.get(CKPT_TAG) == sha]
    if existing:
        version = existing[0]
    else:
        tags = {
            "orch.config_hash": str(manifest["config_hash"]),
            "method": method,
            "arch": str(manifest["arch"]),
            "patch_size": str(manifest["patch_size"]),
            "img_size": str(manifest["img_size"]),
            "epoch": str(manifest["source_checkpoint"].get("epoch")),
            CKPT_TAG: sha,
            **(extra_tags or {}),
        }
        description = (
            f"{method} {manifest['arch']}/{manifest['patch_size']} backbone, config {str(manifest['config_hash'])[:12]}"
            f"; files: {EXPORT_ARTIFACTS}/ ({MANIFEST} says how to load them)"
        )
        version = client.create_model_version(
            name, source=f"runs:/{run_id}/{EXPORT_ARTIFACTS}", run_id=run_id, tags=tags, description=description
        )
    experiment_id = client.get_run(run_id).info.experiment_id
    for key, value in finished_evaluations(client, experiment_id, run_id, sha).items():
        client.set_model_version_tag(name, str(version.version), key, value)
    client.set_tag(run_id, "orch.model_version", f"models:/{name}/{version.version}")
    return version


def finished_evaluations(client: MlflowClient, experiment_id: str, run_id: str, sha256: str) -> dict[str, str]:
    """`eval/...` metrics of the run's FINISHED evaluation child runs of this checkpoint (the latest wins)."""
    children = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`{CKPT_TAG}` = '{sha256}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    return {
        key: str(value)
        for child in children
        for key, value in child.data.metrics.items()
        if key.startswith(EVAL_PREFIX)
    }


def tag_evaluation(client: MlflowClient, run_id: str, sha256: str, metrics: Mapping[str, float]) -> list[str]:
    """Set `eval/<name>` tags on the model versions registered from checkpoint `sha256` of run `run_id`; return
    their `models:/` URIs (none when the checkpoint is not a run's final export, or registration is off)."""
    tagged = []
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if version.tags.get(CKPT_TAG) != sha256:
            continue
        for key, value in metrics.items():
            client.set_model_version_tag(version.name, str(version.version), f"{EVAL_PREFIX}{key}", str(float(value)))
        tagged.append(f"models:/{version.name}/{version.version}")
    return tagged
