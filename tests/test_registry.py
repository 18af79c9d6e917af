"""MLflow holds a run's final export: its files as artifacts (byte-equal to the run folder), its checkpoints as
links, its backbone as a model version of `<experiment>-<method>`, and the evaluation metrics of that backbone
as the version's tags, whichever of registration and evaluation comes first. A real MLflow server for the end
to end path; a local SQLite store for the rest."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from orchestrator.jobs.evaluate import log_child_run
from orchestrator.jobs.files import JobFile
from tests.support import micro_overrides
from trainer.files import MANIFEST, sha256_file
from trainer.presets import load_config
from trainer.registry import (
    CHECKPOINT_LINKS,
    CKPT_TAG,
    checkpoint_links,
    log_export,
    register_export,
    registered_model_name,
    tag_evaluation,
)
from trainer.tracking import MLflowTracker


def test_one_readable_registered_model_name_per_experiment_and_method() -> None:
    assert registered_model_name("composites/paper_core", "selfpatch") == "composites-paper_core-selfpatch"
    assert registered_model_name("selfpatch", "dino") == "selfpatch-dino"
    assert registered_model_name("My Study: v2/ImageNet", "dino") == "my-study-v2-imagenet-dino"
    assert registered_model_name("/..//", "dino") == "dino"
    long = registered_model_name("x" * 300, "selfpatch")
    assert len(long) <= 200 and "/" not in long and ":" not in long


def fake_export(folder: Path, sha: str = "c" * 64, method: str = "selfpatch") -> dict[str, Any]:
    """An export folder as trainer.export writes it (small files; the registry reads only the manifest)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for fmt, name in {"torch": "backbone.pth", "safetensors": "backbone.safetensors"}.items():
        (folder / name).write_bytes(f"{name} {uuid.uuid4()}".encode())
        files[fmt] = {"path": name, "sha256": sha256_file(folder / name)}
    (folder / ".backbone.pth.crashed.tmp").write_bytes(b"a stray temporary file")
    manifest = {
        "method": method,
        "arch": "vit_tiny",
        "patch_size": 4,
        "img_size": 32,
        "config_hash": "h" * 64,
        "source_checkpoint": {"sha256": sha, "epoch": 2},
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def new_run(client: MlflowClient, experiment: str, tmp_path: Path) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        experiment_id = client.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    else:
        experiment_id = found.experiment_id
    return str(client.create_run(experiment_id).info.run_id)


def finished_child(client: MlflowClient, run_id: str, sha: str, metrics: dict[str, float]) -> None:
    """An evaluation child run as orchestrator.jobs.evaluate logs it."""
    parent = client.get_run(run_id)
    tags = {"mlflow.parentRunId": run_id, CKPT_TAG: sha}
    child = client.create_run(parent.info.experiment_id, run_name="eval/knn", tags=tags)
    for key, value in metrics.items():
        client.log_metric(child.info.run_id, f"eval/{key}", value)
    client.set_terminated(child.info.run_id, "FINISHED")


def test_checkpoints_are_linked_with_their_last_record(tmp_path: Path) -> None:
    (tmp_path / "checkpoint0000.pth").write_bytes(b"one")
    (tmp_path / "checkpoint.pth").write_bytes(b"latest")
    records = [
        {"event": "checkpoint", "path": str(tmp_path / "checkpoint.pth"), "epoch": 1, "sha256": "old"},
        {"event": "step", "iteration": 3},
        {"event": "checkpoint", "path": str(tmp_path / "checkpoint0000.pth"), "epoch": 1, "sha256": "s0"},
        {"event": "checkpoint", "path": str(tmp_path / "checkpoint.pth"), "epoch": 2, "sha256": "new"},
        {"event": "checkpoint", "path": str(tmp_path / "gone.pth"), "epoch": 2, "sha256": "x"},
    ]
    log_file = tmp_path / "log.jsonl"
    log_file.write_text("\n".join(map(json.dumps, records)) + '\n{"event": "checkp')  # a line cut by a crash
    links = checkpoint_links(log_file)
    assert [(Path(c["path"]).name, c["epoch"], c["sha256"], c["bytes"]) for c in links] == [
        ("checkpoint.pth", 2, "new", 6),
        ("checkpoint0000.pth", 1, "s0", 3),
    ]
    assert checkpoint_links(tmp_path / "missing.jsonl") == []


def test_export_artifacts_and_one_version_per_run_with_its_tags(client: MlflowClient, tmp_path: Path) -> None:
    run_id = new_run(client, "reg/unit", tmp_path)
    manifest = fake_export(tmp_path / "run" / "export")
    log_export(client, run_id, tmp_path / "run" / "export", [{"path": "/x/checkpoint0001.pth"}], tmp_path / "run")
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert exported == {"export/backbone.pth", "export/backbone.safetensors", "export/manifest.json"}  # no stray
    links = json.loads(Path(client.download_artifacts(run_id, CHECKPOINT_LINKS, str(tmp_path / "dl"))).read_text())
    assert links["checkpoints"] == [{"path": "/x/checkpoint0001.pth"}]
    assert links["folder"] == str((tmp_path / "run").resolve())
    assert client.get_run(run_id).data.tags["orch.checkpoint_dir"] == str((tmp_path / "run").resolve())

    version = register_export(client, run_id, "reg/unit", manifest, {"orch.run_id": "r-1"})
    assert version.name == "reg-unit-selfpatch" and version.source == f"runs:/{run_id}/export"
    assert version.tags["orch.config_hash"] == "h" * 64 and version.tags[CKPT_TAG] == "c" * 64
    assert version.tags["method"] == "selfpatch" and version.tags["arch"] == "vit_tiny"
    assert version.tags["orch.run_id"] == "r-1"
    model = client.get_registered_model("reg-unit-selfpatch")
    assert model.tags == {"orch.experiment": "reg/unit", "method": "selfpatch"}
    assert client.get_run(run_id).data.tags["orch.model_version"] == f"models:/reg-unit-selfpatch/{version.version}"

    again = register_export(client, run_id, "reg/unit", manifest)  # a requeued attempt that exported again
    assert again.version == version.version
    other = register_export(client, new_run(client, "reg/unit", tmp_path), "reg/unit", fake_export(tmp_path / "o"))
    assert other.name == version.name and int(other.version) == int(version.version) + 1

    assert tag_evaluation(client, run_id, "d" * 64, {"knn/top1_k20": 40.0}) == []  # not the final checkpoint
    assert tag_evaluation(client, run_id, "c" * 64, {"knn/top1_k20": 41.5}) == [f"models:/{version.name}/1"]
    tags = client.get_model_version(version.name, version.version).tags
    assert tags["eval/knn/top1_k20"] == "41.5" and all(not k.startswith("eval/") for k in other.tags)


def test_evaluations_that_finished_before_registration_reach_the_version(client: MlflowClient, tmp_path: Path) -> None:
    run_id = new_run(client, "reg/early", tmp_path)
    finished_child(client, run_id, "c" * 64, {"knn/top1_k20": 33.0, "knn/top1_k200": 30.0})
    finished_child(client, run_id, "e" * 64, {"knn/top1_k20": 10.0})  # another checkpoint: not this version
    manifest = fake_export(tmp_path / "export", method="dino")
    log_export(client, run_id, tmp_path / "export", [], tmp_path)
    version = register_export(client, run_id, "reg/early", manifest)
    tags = client.get_model_version(version.name, version.version).tags
    assert version.name == "reg-early-dino"
    assert tags["eval/knn/top1_k20"] == "33.0" and tags["eval/knn/top1_k200"] == "30.0"


def test_registration_off_and_registry_failures_never_fail_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [f"logging.tracking_uri={uri}", "logging.experiment=reg-tracker", "logging.mlflow=true"]
    fake_export(tmp_path / "export")

    off = MLflowTracker(load_config("tiny_cpu", [*base, "logging.register_model=false"]))
    off.log_export(tmp_path / "export", [])
    assert off.run_id and {a.path for a in off.client.list_artifacts(off.run_id, "export")} >= {"export/manifest.json"}
    assert not off.client.search_model_versions(f"run_id = '{off.run_id}'")

    manifest_only = MLflowTracker(load_config("tiny_cpu", [*base, "logging.export_artifacts=false"]))
    manifest_only.log_export(tmp_path / "export", [])
    assert manifest_only.run_id
    assert {a.path for a in manifest_only.client.list_artifacts(manifest_only.run_id, "export")} == {
        "export/manifest.json"
    }
    assert not manifest_only.client.search_model_versions(f"run_id = '{manifest_only.run_id}'")

    broken = MLflowTracker(load_config("tiny_cpu", base))

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("registry down")

    broken.client.create_model_version = refuse  # type: ignore[method-assign]
    broken.log_export(tmp_path / "export", [])  # logs a warning, raises nothing
    assert "backbone not registered: registry down" in caplog.text
    broken.client.log_artifact = refuse  # type: ignore[method-assign]
    broken.log_export(tmp_path / "export", [])
    assert "export not logged: registry down" in caplog.text


# ------------------------------------------------------------------------------- against a real MLflow server


def test_tiny_run_export_is_downloadable_registered_and_tagged_by_its_final_evaluation(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.train import train

    experiment = f"registry/e2e-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    overrides = ["logging.mlflow=true", f"logging.tracking_uri={mlflow_server}", f"logging.experiment={experiment}"]
    cfg = load_config("tiny_cpu", micro_overrides(out, "selfpatch", "optim.epochs=1", *overrides))
    result = train(cfg)
    assert result.status == "completed" and result.mlflow_run_id
    run_id = result.mlflow_run_id
    client = MlflowClient(tracking_uri=mlflow_server)

    # the export, byte for byte, through the server's proxied artifact store; checkpoints only linked
    manifest = json.loads((out / "export" / MANIFEST).read_text())
    names = [e["path"] for e in manifest["files"].values()]
    assert "aggregation.safetensors" in names and "backbone.safetensors" in names
    local = Path(client.download_artifacts(run_id, "export", str(tmp_path / "dl")))
    assert sorted(p.name for p in local.iterdir()) == sorted([*names, MANIFEST])
    for name in [*names, MANIFEST]:
        assert sha256_file(local / name) == sha256_file(out / "export" / name), name
    root = {a.path for a in client.list_artifacts(run_id)}
    assert root == {"config.yaml", "export", CHECKPOINT_LINKS}  # no checkpoint copied
    links = json.loads((Path(client.download_artifacts(run_id, CHECKPOINT_LINKS, str(tmp_path / "l")))).read_text())
    linked = {Path(c["path"]).name: c for c in links["checkpoints"]}
    assert set(linked) == {"checkpoint0000.pth"} and links["folder"] == str(out.resolve())  # checkpoint.pth: a link
    final_sha = manifest["source_checkpoint"]["sha256"]
    assert linked["checkpoint0000.pth"]["sha256"] == sha256_file(out / "checkpoint0000.pth") == final_sha

    # one version of '<experiment>-<method>' whose source is that export
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")
    assert version.name == registered_model_name(experiment, "selfpatch") == experiment.replace("/", "-") + "-selfpatch"
    assert version.tags["orch.config_hash"] == cfg.config_hash() == manifest["config_hash"]
    assert version.tags["method"] == "selfpatch" and version.tags["arch"] == "vit_tiny"
    assert version.tags[CKPT_TAG] == final_sha and version.source == f"runs:/{run_id}/export"
    import mlflow.artifacts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # models:/ URIs resolve through the default registry
    uri = f"models:/{version.name}/{version.version}"
    served = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "m")))
    assert sha256_file(served / "backbone.safetensors") == sha256_file(out / "export" / "backbone.safetensors")

    # the evaluation job runner's MLflow side: the final checkpoint's metrics become the version's tags
    def evaluation(sha: str, metrics: dict[str, float]) -> str | None:
        job = JobFile(
            kind="evaluate",
            job_id=str(uuid.uuid4()),
            payload={"run_id": "r", "benchmark": "knn", "checkpoint_sha256": sha, "checkpoint_step": 8},
            api_url="http://unused",
            report_path="/unused",
            token="t",
            backend="local",
            mlflow_tracking_uri=mlflow_server,
            mlflow_experiment_id=client.get_run(run_id).info.experiment_id,
            mlflow_run_id=run_id,
        )
        return log_child_run(job, "FINISHED", metrics, {})

    assert evaluation("0" * 64, {"knn/top1_k20": 12.0})  # some other checkpoint: the version is untouched
    assert evaluation(final_sha, {"knn/top1_k20": 61.25, "knn/top1_k200": 58.0})
    tags = client.get_model_version(version.name, version.version).tags
    assert tags["eval/knn/top1_k20"] == "61.25" and tags["eval/knn/top1_k200"] == "58.0"


def test_concurrent_first_registrations_make_one_model_with_a_version_each(tmp_path: Path, mlflow_server: str) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = f"registry/race-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(experiment)
    runs = [str(client.create_run(experiment_id).info.run_id) for _ in range(6)]
    manifests = [fake_export(tmp_path / f"e{i}", sha=f"{i}" * 64) for i in range(len(runs))]
    start, errors, versions = threading.Barrier(len(runs)), [], []

    def register(i: int) -> None:
        try:
            start.wait()
            versions.append(
                register_export(MlflowClient(tracking_uri=mlflow_server), runs[i], experiment, manifests[i])
            )
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    name = registered_model_name(experiment, "selfpatch")
    assert {v.name for v in versions} == {name} and len(client.search_registered_models(f"name = '{name}'")) == 1
    assert sorted(int(v.version) for v in versions) == list(range(1, len(runs) + 1))
