"""Tiny CPU pretraining end to end: both methods, checkpoints, exact resume, exports, preemption, DDP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, micro_overrides
from trainer.callbacks import TrainCallback
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.export import export_checkpoint
from trainer.presets import load_config
from trainer.train import train

PY = sys.executable


def _steps(output_dir: Path) -> list[dict[str, float]]:
    lines = (output_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "step"]


def _loss_against(cfg: object, student_state: dict, teacher_state: dict, loss_state: dict) -> tuple[float, float]:
    """Image and patch loss of a student against a fixed teacher on one fixed batch (no drop-path noise)."""
    from trainer.data.loader import build_loader
    from trainer.losses import MultiCropLoss
    from trainer.models.wrapper import build_model

    loader, sampler = build_loader(cfg)  # type: ignore[arg-type]
    sampler.set_epoch(0)
    crops, _ = next(iter(loader))
    student, teacher = build_model(cfg, student=True), build_model(cfg, student=False)  # type: ignore[arg-type]
    student.load_state_dict(student_state)
    teacher.load_state_dict(teacher_state)
    patch_dim = cfg.selfpatch.out_dim if cfg.method == "selfpatch" else None  # type: ignore[attr-defined]
    loss = MultiCropLoss(cfg.head.out_dim, patch_dim)  # type: ignore[attr-defined]
    loss.load_state_dict(loss_state)
    student.eval()
    with torch.no_grad():
        t = teacher(crops if patch_dim else crops[:2], match=True)
        s = student(crops)
        terms = loss(s.cls_logits, t.cls_logits, 0.04, crops[0].shape[0], s.patch_logits, t.patch_logits)
    return float(terms.cls), float(terms.patch) if terms.patch is not None else 0.0


@pytest.mark.parametrize("method", ["selfpatch", "dino"])
def test_tiny_run_learns_and_writes_checkpoints(tmp_path: Path, method: str) -> None:
    cfg = load_config("tiny_cpu", micro_overrides(tmp_path, method, "optim.epochs=6"))
    torch.manual_seed(cfg.seed)
    from trainer.models.wrapper import build_model

    initial_student = build_model(cfg, student=True).state_dict()  # the seeded init training starts from
    result = train(cfg)
    assert result.status == "completed" and result.iteration == 6 * 8
    steps = _steps(tmp_path)
    assert ("train/patch_loss" in steps[-1]) == (method == "selfpatch")
    assert all(s["train/loss"] == s["train/loss"] for s in steps)  # finite, logged every 2 steps

    # DINO's loss chases a moving target (EMA teacher, center), so it is not monotone; what must fall is the
    # student's loss against its final teacher: the trained student predicts that teacher's targets better.
    state = load_checkpoint(tmp_path / "checkpoint.pth")  # weights_only=True
    before = _loss_against(cfg, initial_student, state["teacher"], state["dino_loss"])
    after = _loss_against(cfg, state["student"], state["teacher"], state["dino_loss"])
    assert after[0] < before[0] - 0.1, f"image loss vs final teacher: {before[0]:.3f} -> {after[0]:.3f}"
    if method == "selfpatch":
        assert after[1] < before[1] - 0.1, f"patch loss vs final teacher: {before[1]:.3f} -> {after[1]:.3f}"

    names = sorted(p.name for p in tmp_path.glob("checkpoint*.pth"))
    assert names == ["checkpoint.pth"] + [f"checkpoint{e:04d}.pth" for e in range(6)]
    assert state["epoch"] == 6 and state["iteration"] == 48 and state["method"] == method
    assert set(state["dino_loss"]) == ({"center", "patch_center"} if method == "selfpatch" else {"center"})
    assert isinstance(state["config"], dict) and state["args"]["arch"] == "vit_tiny"
    keys = {k.split(".")[0] for k in state["teacher"]}
    assert keys == ({"backbone", "ca_head", "c_head", "p_head"} if method == "selfpatch" else {"backbone", "head"})
    assert (tmp_path / "export" / "manifest.json").exists()


def _run_micro(output_dir: Path, *extra: str) -> None:
    train(load_config("tiny_cpu", micro_overrides(output_dir, "selfpatch", *extra)))


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run_micro(straight, "data.num_workers=1")
    _run_micro(resumed, "stop_at_step=5", "data.num_workers=1")  # mid-epoch (8 steps per epoch)
    mid = load_checkpoint(resumed / "checkpoint.pth")
    assert mid["iteration"] == 5 and mid["epoch"] == 0
    _run_micro(resumed, "data.num_workers=1")
    a, b = load_checkpoint(straight / "checkpoint.pth"), load_checkpoint(resumed / "checkpoint.pth")
    assert a["iteration"] == b["iteration"] == 16
    for part in ("student", "teacher", "dino_loss"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), f"{part}.{key} differs after resume"
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"])


#: Builds the training loader with one worker, takes a batch and keeps the iterator referenced until exit.
_HELD_LOADER = """
import sys
from pathlib import Path
from tests.support import micro_overrides
from trainer.data.loader import build_loader, close_loader
from trainer.presets import load_config

cfg = load_config("tiny_cpu", micro_overrides(Path(sys.argv[1]), "dino", "data.num_workers=1"))
loader, sampler = build_loader(cfg)
sampler.set_epoch(0)
batches = iter(loader)
next(batches)
if sys.argv[2] == "close":
    close_loader(loader)
print("exiting", flush=True)
"""


@pytest.mark.parametrize("close", [True, False])
def test_a_closed_loader_lets_the_process_exit(tmp_path: Path, close: bool) -> None:
    """Workers ignore SIGTERM (preemption is the training process's), and multiprocessing's exit hook stops
    live workers with SIGTERM, then joins them: without `close_loader` the exit waits forever."""
    cmd = [PY, "-c", _HELD_LOADER, str(tmp_path), "close" if close else "keep"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "exiting\n"
        try:
            code: int | None = proc.wait(timeout=60 if close else 10)
        except subprocess.TimeoutExpired:
            code = None
        assert code == (0 if close else None)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone once it exited
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_training_stops_its_loader_workers_even_when_it_fails(tmp_path: Path) -> None:
    import multiprocessing

    class Boom(TrainCallback):
        def on_log(self, step: int, metrics: dict[str, float]) -> None:
            raise RuntimeError("callback failed")

    cfg = load_config("tiny_cpu", micro_overrides(tmp_path, "dino", "data.num_workers=1"))
    with pytest.raises(RuntimeError, match="callback failed") as failure:
        train(cfg, callbacks=[Boom()])
    assert failure.traceback  # the frames, and with them the loader, are still referenced here
    assert multiprocessing.active_children() == []


def test_only_a_run_that_ended_leaves_the_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank that raised must not destroy the group (peers waiting in a collective could block it); a rank
    whose run ended, completed or interrupted, leaves it."""
    import trainer.train as train_module
    from trainer.callbacks import TrainResult
    from trainer.distributed import DistInfo

    left: list[DistInfo] = []
    monkeypatch.setattr(train_module, "init_distributed", lambda device_type: DistInfo(1, 2, 1))
    monkeypatch.setattr(train_module, "cleanup", left.append)
    cfg = load_config("tiny_cpu", micro_overrides(tmp_path, "dino"))

    def failing(*args: object) -> TrainResult:
        raise RuntimeError("out of memory on rank 1")

    monkeypatch.setattr(train_module, "_train", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(cfg)
    assert left == []
    ended = TrainResult(status="interrupted", epoch=0, iteration=3, checkpoint=None)
    monkeypatch.setattr(train_module, "_train", lambda *args: ended)
    assert train(cfg) is ended and left == [DistInfo(1, 2, 1)]


def test_export_loads_strictly_into_timm_and_gives_the_same_features(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file

    from trainer.models.wrapper import build_model

    for method in ("selfpatch", "dino"):
        out = tmp_path / method
        _run_micro(out, f"method={method}", "optim.epochs=1")
        manifest = json.loads((out / "export" / "manifest.json").read_text())
        model = timm.create_model(manifest["timm"]["model_name"], pretrained=False, **manifest["timm"]["kwargs"])
        model.load_state_dict(load_file(out / "export" / "backbone.safetensors"), strict=True)
        model.load_state_dict(torch.load(out / "export" / "backbone.pth", weights_only=True), strict=True)
        mm = torch.load(out / "export" / "backbone_mm.pth", weights_only=True)
        assert all(k.startswith("backbone.") for k in mm["state_dict"])
        assert manifest["has_class_token"] == (method == "dino")
        for entry in manifest["files"].values():
            from trainer.files import sha256_file

            assert sha256_file(out / "export" / entry["path"]) == entry["sha256"]

        cfg = load_config("tiny_cpu", micro_overrides(out, method))
        ours = build_model(cfg, student=False)
        ours.load_state_dict(load_checkpoint(out / "checkpoint.pth")["teacher"])
        assert ("aggregation" in manifest["files"]) == (method == "selfpatch")
        if method == "selfpatch":  # the aggregation module travels with the export and loads strictly
            exported = load_file(out / "export" / "aggregation.safetensors")
            fresh = build_model(cfg, student=False).ca_head
            fresh.load_state_dict(exported, strict=True)
            for key, tensor in ours.ca_head.state_dict().items():
                assert torch.equal(tensor, exported[key])
        x = torch.randn(2, 3, 32, 32)
        model.eval()
        ours.eval()
        with torch.no_grad():
            expected = ours.backbone.features(x)
            got = model.forward_features(x)
            got = got[:, 0] if method == "dino" else got
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_corrupt_and_foreign_checkpoints_are_refused_clearly(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        export_checkpoint(corrupt, tmp_path / "out")
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        export_checkpoint(foreign, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _cli(*args: str, cwd: Path = REPO) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [PY, "-m", "trainer", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow  # a real process is signalled and rerun
def test_sigterm_checkpoints_exits_75_and_the_rerun_finishes(tmp_path: Path) -> None:
    args = ["--config", "tiny_cpu", *micro_overrides(tmp_path, "selfpatch", "optim.epochs=8", "logging.log_every=1")]
    proc = _cli(*args)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and '"step"' in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    state = load_checkpoint(tmp_path / "checkpoint.pth")
    assert 0 < state["iteration"] < 8 * 8
    assert "interrupted" in err and "SIGTERM" in err
    done = _cli(*args)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    assert load_checkpoint(tmp_path / "checkpoint.pth")["iteration"] == 8 * 8


def test_cli_rejects_bad_input_with_one_line_and_nonzero_exit(tmp_path: Path) -> None:
    proc = _cli("--config", "tiny_cpu", "selfpatch.k=12", f"checkpoint.output_dir={tmp_path}")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "selfpatch.k" in err
    proc = _cli("--config", "tiny_cpu", f"data.path={tmp_path / 'nowhere'}", f"checkpoint.output_dir={tmp_path}")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "not found" in err.splitlines()[-1]
    proc = _cli("--config", "tiny_cpu", "--dry-run")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "config_hash" in out and not (REPO / "outputs" / "tiny_cpu" / "x").exists()


@pytest.mark.slow  # two processes train together
def test_two_process_gloo_run(tmp_path: Path) -> None:
    torchrun = str(Path(PY).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29613",
            "-m",
            "trainer",
            "--config",
            "tiny_cpu",
            *micro_overrides(tmp_path, "selfpatch", "optim.batch_size_per_gpu=4"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(tmp_path / "checkpoint.pth")
    assert state["world_size"] == 2 and state["iteration"] == 16  # 64 images / (2 x 4) per step, 2 epochs
    assert all(torch.isfinite(t).all() for t in state["teacher"].values())
    assert not torch.equal(state["dino_loss"]["center"], torch.zeros_like(state["dino_loss"]["center"]))
