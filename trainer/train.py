"""DINO and DINO+SelfPatch pretraining: one readable loop in the spirit of DINO's `main_dino.py`.

Schedules are arrays indexed by the global iteration; every stateful piece (networks, optimiser, scaler,
centers, RNGs, data position) is restored from one checkpoint dict, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.callbacks import CheckpointInfo, TrainCallback, TrainResult
from trainer.checkpoint import (
    FORMAT_VERSION,
    capture_rng_state,
    link_latest,
    load_checkpoint,
    require_training_checkpoint,
    restore_rng_state,
    save_checkpoint,
    strip_prefixes,
)
from trainer.config import TrainConfig
from trainer.data.augment import build_device_stage
from trainer.data.loader import build_loader, close_loader
from trainer.diagnostics import Collapse, CollapseDetector, ratios
from trainer.distributed import (
    DistInfo,
    StopVote,
    barrier,
    cleanup,
    full_optimizer_state_dict,
    full_state_dict,
    init_distributed,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from trainer.engine import Engine
from trainer.files import LATEST, numbered_name, sha256_file
from trainer.preemption import PreemptionFlag
from trainer.presets import ConfigError, dump_yaml, validate_config
from trainer.registry import checkpoint_links
from trainer.schedules import Schedules
from trainer.tracking import NullTracker, Tracker, build_tracker, git_commit

log = logging.getLogger("trainer")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available", field="device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision 'fp16' needs a CUDA device (use bf16 or fp32 on CPU)", field="precision")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def dino_args(cfg: TrainConfig) -> dict[str, Any]:
    """The official main_dino.py / main_selfpatch.py flags equivalent to this config."""
    args = {
        "arch": cfg.model.arch,
        "patch_size": cfg.model.patch_size,
        "out_dim": cfg.head.out_dim,
        "norm_last_layer": cfg.head.norm_last_layer,
        "momentum_teacher": cfg.optim.momentum_teacher,
        "use_bn_in_head": False,
        "warmup_teacher_temp": cfg.loss.warmup_teacher_temp,
        "teacher_temp": cfg.loss.teacher_temp,
        "warmup_teacher_temp_epochs": cfg.loss.warmup_teacher_temp_epochs,
        "use_fp16": cfg.precision in ("auto", "fp16"),
        "weight_decay": cfg.optim.weight_decay,
        "weight_decay_end": cfg.optim.weight_decay_end,
        "clip_grad": cfg.optim.clip_grad,
        "batch_size_per_gpu": cfg.optim.batch_size_per_gpu,
        "epochs": cfg.optim.epochs,
        "freeze_last_layer": cfg.optim.freeze_last_layer,
        "lr": cfg.optim.lr,
        "warmup_epochs": cfg.optim.warmup_epochs,
        "min_lr": cfg.optim.min_lr,
        "optimizer": cfg.optim.optimizer,
        "drop_path_rate": cfg.model.drop_path_rate,
        "global_crops_scale": list(cfg.crops.global_scale),
        "local_crops_number": cfg.crops.local_number,
        "local_crops_scale": list(cfg.crops.local_scale),
        "data_path": str(cfg.data.path),
        "output_dir": str(cfg.checkpoint.output_dir),
        "saveckp_freq": cfg.checkpoint.saveckp_freq,
        "seed": cfg.seed,
        "num_workers": cfg.data.num_workers,
    }
    if cfg.method == "selfpatch":
        args.update(out_dim_selfpatch=cfg.selfpatch.out_dim, k_num=cfg.selfpatch.k)
    return args


class JsonLog:
    """JSON lines to output_dir/log.jsonl (always) and to stdout when no progress bar is shown."""

    def __init__(self, path: Path, echo: bool) -> None:
        self.path, self.echo = path, echo

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        with self.path.open("a") as handle:
            handle.write(line + "\n")
        if self.echo:
            print(line, flush=True)


class Meter:
    """Means of step metrics over a logging window and over the epoch, plus images per second of each.

    Steps add device tensors; nothing is read until a window or an epoch is logged, which costs one host
    sync for all its metrics (a window is folded into the epoch's sums on the device when it is read, so
    the epoch keeps a few sums, not every step). Throughput is images over wall time between those reads:
    what the device did, not how fast the host queued it.
    """

    def __init__(self) -> None:
        self.window: dict[str, list[torch.Tensor]] = {}
        self.epoch: dict[str, tuple[torch.Tensor, int]] = {}  # sum (float64, on the device) and count
        self.images = {"window": 0, "epoch": 0}
        now = time.perf_counter()
        self.started = {"window": now, "epoch": now}

    def add(self, images: int, **values: torch.Tensor) -> None:
        for key, value in values.items():
            self.window.setdefault(key, []).append(value.detach())
        self.images = {k: n + images for k, n in self.images.items()}

    def window_means(self) -> dict[str, float]:
        keys = list(self.window)
        sums = [torch.stack(self.window[k]).double().sum() for k in keys]
        counts = [len(self.window[k]) for k in keys]
        for key, total, count in zip(keys, sums, counts, strict=True):
            before, n = self.epoch.get(key, (torch.zeros_like(total), 0))
            self.epoch[key] = (before + total, n + count)
        self.window = {}
        values = (torch.stack(sums) if sums else torch.zeros(0)).tolist()  # the one wait for the device
        means = {k: v / n for k, v, n in zip(keys, values, counts, strict=True)}
        return means | {"img_per_s": self._throughput("window")}

    def epoch_means(self) -> dict[str, float]:
        if self.window:
            self.window_means()  # fold the open window in
        keys = list(self.epoch)
        values = (torch.stack([self.epoch[k][0] for k in keys]) if keys else torch.zeros(0)).tolist()
        means = {k: v / self.epoch[k][1] for k, v in zip(keys, values, strict=True)}
        self.epoch = {}
        return means | {"img_per_s": self._throughput("epoch")}

    def _throughput(self, span: str) -> float:
        now = time.perf_counter()
        rate = self.images[span] / max(now - self.started[span], 1e-9)
        self.images[span], self.started[span] = 0, now
        return rate


def train(config: TrainConfig | Mapping[str, Any], callbacks: Sequence[TrainCallback] = ()) -> TrainResult:
    """Train (or resume) the run described by `config`; launchers call this directly."""
    cfg = config if isinstance(config, TrainConfig) else validate_config(config)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    with ExitStack() as closing:
        result = _train(cfg, device, amp_dtype, info, list(callbacks) if info.is_main else [], closing)
    # Only a run that ended leaves the process group. A rank that raised exits without it: destroying a group
    # while the other ranks wait in a collective can block (NCCL) until the collective times out, and the
    # launcher (torchrun, SLURM) stops the other ranks as soon as this one has exited.
    cleanup(info)
    return result


def _train(
    cfg: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    info: DistInfo,
    callbacks: list[TrainCallback],
    closing: ExitStack,
) -> TrainResult:
    out_dir = Path(cfg.checkpoint.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ============ data ============
    loader, sampler = build_loader(cfg, info.rank, info.world_size, pin_memory=device.type == "cuda")
    to_device = build_device_stage(cfg.crops, cfg.data.augment_backend)
    closing.callback(close_loader, loader)  # however training ends
    iters_per_epoch = sampler.batches_per_epoch
    total_iters = cfg.optim.epochs * iters_per_epoch

    # ============ student, teacher, loss, optimiser, schedules ============
    engine = Engine.build(cfg, device, amp_dtype, info)
    student, teacher, loss_fn = engine.student, engine.teacher, engine.loss_fn
    optimizer, scaler = engine.optimizer, engine.scaler
    schedules = Schedules.build(cfg, iters_per_epoch, info.world_size)

    # ============ resume ============
    iteration, mlflow_run_id = 0, cfg.logging.run_id
    latest = out_dir / LATEST
    if cfg.checkpoint.resume and latest.exists():
        state = load_checkpoint(latest, map_location="cpu")
        require_training_checkpoint(state, latest)
        _warn_config_change(state, cfg)
        # every rank loads the whole state; under FSDP each keeps its shards (plain load_state_dict otherwise)
        load_full_state_dict(student, strip_prefixes(state["student"]))
        load_full_state_dict(teacher, strip_prefixes(state["teacher"]))
        load_full_optimizer_state_dict(student, optimizer, state["optimizer"])
        loss_fn.load_state_dict(state["dino_loss"])
        if scaler is not None and state.get("fp16_scaler"):
            scaler.load_state_dict(state["fp16_scaler"])
        if "rng" in state:
            restore_rng_state(state["rng"])
        iteration = int(state["iteration"])
        mlflow_run_id = mlflow_run_id or state.get("mlflow_run_id")
        log.info("resumed from %s at iteration %d", latest, iteration)
    if iteration >= total_iters:
        log.info("%s is already complete (%d iterations)", out_dir, iteration)

    # ============ logging ============
    if info.is_main:
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        (out_dir / "config_hash.txt").write_text(cfg.config_hash() + "\n")
    tracker: Tracker = NullTracker()
    if info.is_main and cfg.logging.mlflow:
        logging_cfg = cfg.logging.model_copy(update={"run_id": mlflow_run_id})
        tracker = build_tracker(cfg.model_copy(update={"logging": logging_cfg}), True)
        if iteration == 0:
            tracker.log_artifact(out_dir / "config.yaml")
    interactive = cfg.logging.progress == "on" or (cfg.logging.progress == "auto" and sys.stderr.isatty())
    jsonl = JsonLog(out_dir / "log.jsonl", echo=info.is_main and not interactive)
    for cb in callbacks:
        cb.on_start(
            {
                "output_dir": str(out_dir),
                "iteration": iteration,
                "total_iterations": total_iters,
                "mlflow_run_id": tracker.run_id,
                "config_hash": cfg.config_hash(),
            }
        )

    commit = git_commit() if info.is_main else None
    last_metrics: dict[str, float] = {}

    def save(kind: str, epoch_done: int, numbered: bool = False) -> CheckpointInfo | None:
        """Every rank reaches here; rank 0 writes checkpoint.pth (and a numbered copy)."""
        engine.check_finite()  # never save a state past a non-finite step (every rank stops here alike)
        # under FSDP these gather the shards (collective: every rank, before rank 0 alone goes on); for a
        # plain or DDP student they are the plain state_dict() calls, so every layout is the same
        student_state, teacher_state = full_state_dict(student), full_state_dict(teacher)
        optimizer_state = full_optimizer_state_dict(student, optimizer)
        if not info.is_main:
            return None
        state = {
            "format_version": FORMAT_VERSION,
            "method": cfg.method,
            "student": student_state,
            "teacher": teacher_state,
            "optimizer": optimizer_state,
            "epoch": iteration // iters_per_epoch,
            "iteration": iteration,
            "config": cfg.model_dump(mode="json"),
            "config_hash": cfg.config_hash(),
            "args": dino_args(cfg),
            "dino_loss": loss_fn.state_dict(),
            "fp16_scaler": scaler.state_dict() if scaler is not None else None,
            "rng": capture_rng_state(),
            "metrics": last_metrics,
            "mlflow_run_id": tracker.run_id,
            "git_commit": commit,
            "world_size": info.world_size,
        }
        target = out_dir / (numbered_name(epoch_done - 1) if numbered else LATEST)
        save_checkpoint(state, target)
        if numbered:  # the same bytes under checkpoint.pth, through a hard link renamed into place
            link_latest(target, out_dir / LATEST)
        ckpt = CheckpointInfo(target, epoch_done, iteration, sha256_file(target), kind)
        record = {"event": "checkpoint", "path": str(target), "epoch": epoch_done, "iteration": iteration}
        jsonl.write({**record, "kind": kind, "sha256": ckpt.sha256})
        for cb in callbacks:
            cb.on_checkpoint(ckpt)
        return ckpt

    # ============ training ============
    stop_at = cfg.stop_at_step
    result_status, reason = "completed", None
    meter = Meter()
    out_dims = {"cls": cfg.head.out_dim} | ({"patch": cfg.selfpatch.out_dim} if cfg.method == "selfpatch" else {})
    detector = CollapseDetector(
        out_dims,
        cfg.collapse.uniform_ratio,
        cfg.collapse.onehot_ratio,
        start=int(cfg.collapse.after * total_iters),
        windows=cfg.collapse.windows,
    )
    collapsed: Collapse | None = None
    start_time = time.time()
    vote = StopVote(info)
    with PreemptionFlag() as preemption:
        start_epoch = iteration // iters_per_epoch
        for epoch in range(start_epoch, cfg.optim.epochs):
            sampler.set_epoch(epoch, start_batch=iteration - epoch * iters_per_epoch)
            temp = float(schedules.teacher_temp[epoch])
            batches: Any = loader
            if interactive and info.is_main:
                from tqdm import tqdm

                batches = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", leave=False, dynamic_ncols=True)
            for crops, _labels in batches:
                it = iteration
                crops = to_device(crops, device)
                batch = crops[0].shape[0]
                logs_now = (it + 1) % cfg.logging.log_every == 0 or it + 1 == total_iters
                step = engine.step(
                    crops,
                    epoch=epoch,
                    lr=float(schedules.lr[it]),
                    weight_decay=float(schedules.weight_decay[it]),
                    momentum=float(schedules.momentum[it]),
                    temp=temp,
                    diagnose=info.is_main and logs_now,
                    iteration=it,
                )
                iteration += 1

                values = {"loss": step.loss, "cls_loss": step.cls_loss}
                if step.patch_loss is not None:
                    values["patch_loss"] = step.patch_loss
                meter.add(batch * info.world_size, **values)
                if logs_now:  # the window's host sync, on every rank: all stop at the same step
                    engine.check_finite()
                    window = meter.window_means()
                if info.is_main and logs_now:
                    metrics = {f"train/{k}": v for k, v in window.items()}
                    metrics.update(
                        {
                            "train/lr": float(schedules.lr[it]),
                            "train/wd": float(schedules.weight_decay[it]),
                            "train/momentum": float(schedules.momentum[it]),
                            "train/teacher_temp": temp,
                            "epoch": iteration / iters_per_epoch,
                        }
                    )
                    metrics.update(step.diagnostics)
                    metrics.update(ratios(step.diagnostics, out_dims))
                    last_metrics = metrics
                    tracker.log_metrics(metrics, step=iteration)
                    jsonl.write({"event": "step", "iteration": iteration, **metrics})
                    for cb in callbacks:
                        cb.on_log(iteration, metrics)
                    found = detector.update(iteration, step.diagnostics)
                    if found is not None:
                        collapsed = found
                        record = {"event": "collapse", "iteration": iteration, "head": found.head, "mode": found.mode}
                        record |= {"ratio": found.ratio, "reason": found.reason(), "stop": cfg.collapse.stop}
                        jsonl.write(record)
                        tracker.set_tag("orch.collapsed", f"{found.mode}:{found.head}")
                        log.warning("%s", found.reason())
                        for cb in callbacks:
                            cb.on_collapse(record)
                    if interactive:
                        batches.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")

                # every rank learns of a signal, or of rank 0's collapse finding, and stops at the same step
                collapse_voted, stop_requested = vote(cfg.collapse.stop and collapsed is not None, preemption.requested)
                if collapse_voted:
                    reason = collapsed.reason() if collapsed is not None else "collapsed (found by rank 0)"
                    result_status = "collapsed"
                    break
                if stop_requested or (stop_at is not None and iteration >= stop_at):
                    reason = f"signal {preemption.signal_name}" if stop_requested else f"stop_at_step={stop_at}"
                    result_status = "interrupted"
                    break
                every = cfg.checkpoint.every_n_steps
                if every and iteration % every == 0 and iteration % iters_per_epoch:
                    save("step", iteration // iters_per_epoch)
            if result_status != "completed":
                break

            # ============ end of epoch: log and checkpoint ============
            epoch_stats = {f"train_{k}": v for k, v in meter.epoch_means().items()}
            epoch_done = epoch + 1
            freq = cfg.checkpoint.saveckp_freq
            numbered = bool(freq) and (epoch % freq == 0 or epoch_done == cfg.optim.epochs)
            save("epoch", epoch_done, numbered=numbered)
            jsonl.write(
                {
                    "event": "epoch",
                    "epoch": epoch_done,
                    "iteration": iteration,
                    "elapsed_s": round(time.time() - start_time, 2),
                    **epoch_stats,
                }
            )

    vote.settle()  # the last vote in flight, before any other collective

    # ============ finish ============
    checkpoint_path: Path | None = latest if latest.exists() else None
    manifest_path = None
    if result_status != "completed":  # interrupted (resume it) or collapsed (look at it)
        save("interrupt", iteration // iters_per_epoch)
        log.warning("stopped at iteration %d (%s); checkpoint %s", iteration, reason, latest)
    elif info.is_main and checkpoint_path is not None:
        from trainer.export import export_checkpoint
        from trainer.files import MANIFEST

        export_checkpoint(checkpoint_path, out_dir / "export")
        manifest_path = out_dir / "export" / MANIFEST
    barrier(info)
    if manifest_path is not None:  # after the barrier: the other ranks need not wait for the upload
        tracker.log_export(manifest_path.parent, checkpoint_links(jsonl.path))
    tracker.finish({"interrupted": "KILLED", "collapsed": "FAILED"}.get(result_status, "FINISHED"))
    result = TrainResult(
        status=result_status,
        epoch=iteration // iters_per_epoch,
        iteration=iteration,
        checkpoint=checkpoint_path if checkpoint_path is None or checkpoint_path.exists() else None,
        metrics=last_metrics,
        mlflow_run_id=tracker.run_id,
        manifest=manifest_path,
        reason=reason,
    )
    for cb in callbacks:
        cb.on_end(result)
    return result


def _warn_config_change(state: Mapping[str, Any], cfg: TrainConfig) -> None:
    if state.get("config_hash") and state["config_hash"] != cfg.config_hash():
        try:
            old = validate_config(state["config"]).hashed_dict()
        except ConfigError:
            old = {}
        new = cfg.hashed_dict()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        log.warning("resuming with a changed config (sections: %s)", ", ".join(changed) or "?")
