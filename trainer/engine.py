"""The pieces of a training run and its single optimisation step, shared by the loop and the benchmarks."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.diagnostics import step_diagnostics
from trainer.distributed import DistInfo, wrap_student
from trainer.losses import MultiCropLoss
from trainer.models.wrapper import DINOModel, MultiCropOutput, SelfPatchModel, build_model
from trainer.optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_tensor,
    ema_update,
    set_schedule_values,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; DINO stops here too (dino#58: try precision=fp32)."""


@dataclass
class StepValues:
    loss: float
    cls_loss: float
    patch_loss: float | None
    diagnostics: dict[str, float] = field(default_factory=dict)  # `diag/...` on steps asked to diagnose


@dataclass
class Engine:
    cfg: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    student: DINOModel | SelfPatchModel
    teacher: DINOModel | SelfPatchModel
    student_ddp: nn.Module  # the student, DDP-wrapped when distributed
    loss_fn: MultiCropLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None

    @classmethod
    def build(cls, cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None, info: DistInfo) -> Engine:
        student = build_model(cfg, student=True).to(device)
        teacher = build_model(cfg, student=False).to(device)
        teacher.load_state_dict(student.state_dict())  # teacher and student start equal
        for param in teacher.parameters():
            param.requires_grad = False
        teacher.eval()
        student_ddp = wrap_student(student, teacher, cfg, info, device)  # DDP or FSDP2 (cfg.distributed)
        selfpatch = cfg.method == "selfpatch"
        loss_fn = MultiCropLoss(
            cfg.head.out_dim,
            cfg.selfpatch.out_dim if selfpatch else None,
            student_temp=cfg.loss.student_temp,
            center_momentum=cfg.loss.center_momentum,
            patch_weight=cfg.selfpatch.loss_weight,
        ).to(device)
        optimizer = build_optimizer(cfg.optim, student)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        return cls(cfg, device, amp_dtype, student, teacher, student_ddp, loss_fn, optimizer, scaler)

    @property
    def teacher_all_crops(self) -> bool:
        return self.cfg.method == "selfpatch" and self.cfg.selfpatch.teacher_all_crops

    def step(
        self,
        crops: list[torch.Tensor],
        *,
        epoch: int,
        lr: float,
        weight_decay: float,
        momentum: float,
        temp: float,
        diagnose: bool = False,
    ) -> StepValues:
        """Teacher and student forward, loss, backward with per-tensor clipping, AdamW step, teacher EMA; with
        `diagnose`, also the collapse diagnostics of both heads (against the centers the loss uses)."""
        cfg = self.cfg
        set_schedule_values(self.optimizer, lr, weight_decay)
        batch = crops[0].shape[0]
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        with autocast:
            with torch.no_grad():
                teacher_out = self.teacher(crops if self.teacher_all_crops else crops[:2], match=True)
            student_out = self.student_ddp(crops)
            diagnostics = self.diagnostics(teacher_out, student_out, temp) if diagnose else {}
            terms = self.loss_fn(
                student_out.cls_logits,
                teacher_out.cls_logits,
                temp,
                batch,
                student_out.patch_logits,
                teacher_out.patch_logits,
            )
        loss_value = terms.total.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} in epoch {epoch}; this step was not applied. "
                "Try precision=fp32, a lower optim.lr or a lower loss.teacher_temp."
            )

        self.optimizer.zero_grad(set_to_none=True)
        clip = cfg.optim.clip_grad
        if self.scaler is None:
            terms.total.backward()
            if clip:
                clip_gradients_per_tensor(self.student.parameters(), clip)
            cancel_last_layer_gradients(self.student, epoch, cfg.optim.freeze_last_layer)
            self.optimizer.step()
        else:
            self.scaler.scale(terms.total).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
                clip_gradients_per_tensor(self.student.parameters(), clip)
            cancel_last_layer_gradients(self.student, epoch, cfg.optim.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        ema_update(self.teacher.parameters(), self.student.parameters(), momentum)
        patch = None if terms.patch is None else terms.patch.item()
        return StepValues(loss_value, terms.cls.item(), patch, diagnostics)

    def diagnostics(self, teacher: MultiCropOutput, student: MultiCropOutput, temp: float) -> dict[str, float]:
        """Collapse diagnostics of the image head and (SelfPatch) the patch head, on the views both saw."""
        rows = teacher.cls_logits.shape[0]
        heads: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {
            "cls": (teacher.cls_logits, student.cls_logits[:rows], self.loss_fn.center, teacher.features)
        }
        if teacher.patch_logits and self.loss_fn.has_patch_term:
            pairs = list(zip(teacher.patch_logits, student.patch_logits, strict=False))
            logits_t = torch.cat([t.reshape(-1, t.shape[-1]) for t, _ in pairs])
            logits_s = torch.cat([s[: t.shape[0]].reshape(-1, s.shape[-1]) for t, s in pairs])
            feats = [f.reshape(-1, f.shape[-1]) for f in teacher.patch_features or []]
            heads["patch"] = (logits_t, logits_s, self.loss_fn.patch_center, torch.cat(feats) if feats else None)
        return step_diagnostics(heads, temp, self.cfg.loss.student_temp)
