"""The pieces of a training run and its single optimisation step, shared by the loop and the benchmarks."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
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
    masked_step,
    set_schedule_values,
    skips_on_device,
)

NONFINITE_HINT = "Try precision=fp32, a lower optim.lr or a lower loss.teacher_temp."


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; DINO stops here too (dino#58: try precision=fp32)."""


@dataclass
class StepValues:
    """One step's losses as 0-d device tensors: reading them (`.item()`) is the host sync, done per log window."""

    loss: torch.Tensor
    cls_loss: torch.Tensor
    patch_loss: torch.Tensor | None
    diagnostics: dict[str, float] = field(default_factory=dict)  # `diag/...` on steps asked to diagnose


class FiniteGuard:
    """DINO's "stop at a non-finite loss, do not apply that step", decided on the device.

    `ok` is sticky: after the first non-finite step every later step is masked out too, so the state stays
    that of the last finite step, exactly as if the run had stopped there; `check` (one host sync) raises.
    Across processes the flag is all-reduced, so every rank masks the same steps (gradients are shared).
    """

    def __init__(self, device: torch.device) -> None:
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.first_bad = torch.zeros(3, dtype=torch.float64, device=device)  # loss, iteration, epoch

    def update(self, loss: torch.Tensor, iteration: int, epoch: int) -> torch.Tensor:
        """Fold this step's loss into the flag; returns the (device) flag: apply this step or not."""
        finite = torch.isfinite(loss.detach())
        if dist.is_available() and dist.is_initialized():
            bad = (~finite).to(torch.float32)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            finite = bad == 0
        newly_bad = self.ok & ~finite
        where = torch.empty_like(self.first_bad)
        where[0] = loss.detach().to(torch.float64)
        where[1], where[2] = iteration, epoch  # fills: no host-to-device copy
        self.first_bad = torch.where(newly_bad, where, self.first_bad)
        self.ok = self.ok & finite
        return self.ok

    def check(self) -> None:
        """Raise NonFiniteLossError if any step so far had a non-finite loss (one host sync)."""
        if bool(self.ok):
            return
        loss, iteration, epoch = self.first_bad.tolist()
        raise NonFiniteLossError(
            f"loss is {loss} at iteration {int(iteration)} in epoch {int(epoch)}; neither that step nor any "
            f"later one was applied. {NONFINITE_HINT}"
        )


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
    guard: FiniteGuard | None = None  # the deferred finite check; None: a host check every step

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        info: DistInfo,
        *,
        compile_backend: str = "inductor",
    ) -> Engine:
        """`compile_backend` is torch.compile's backend when cfg.compile is on (tests use "aot_eager")."""
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
        optimizer = build_optimizer(cfg.optim, student, device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        # deferred: a fused optimizer skips on a device flag; GradScaler skips a step whose gradients are NaN
        deferred = cfg.optim.finite_check == "deferred" and (skips_on_device(optimizer) or scaler is not None)
        guard = FiniteGuard(device) if deferred else None
        if cfg.compile != "off":
            compile_regions(cfg.compile, student, teacher, loss_fn, compile_backend)
        return cls(cfg, device, amp_dtype, student, teacher, student_ddp, loss_fn, optimizer, scaler, guard)

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
        iteration: int = -1,
    ) -> StepValues:
        """Teacher and student forward, loss, backward with per-tensor clipping, AdamW step, teacher EMA; with
        `diagnose`, also the collapse diagnostics of both heads (against the centers the loss uses).

        No host sync: the losses come back as device tensors, and with the deferred finite check a non-finite
        step is masked out on the device (`check_finite` raises later); else it raises here, unapplied.
        """
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
            centers = [b.clone() for b in self.loss_fn.buffers()] if self.guard is not None else []
            terms = self.loss_fn(
                student_out.cls_logits,
                teacher_out.cls_logits,
                temp,
                batch,
                student_out.patch_logits,
                teacher_out.patch_logits,
            )
        keep: torch.Tensor | None = None
        if self.guard is None:
            loss_value = terms.total.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"loss is {loss_value} in epoch {epoch}; this step was not applied. {NONFINITE_HINT}"
                )
        else:
            keep = self.guard.update(terms.total, iteration, epoch)
            with torch.no_grad():  # the centers took their EMA step inside the loss: undo it on a masked step
                for buffer, before in zip(self.loss_fn.buffers(), centers, strict=True):
                    buffer.copy_(torch.where(keep, buffer, before))

        self.optimizer.zero_grad(set_to_none=True)
        clip = cfg.optim.clip_grad
        if self.scaler is None:
            terms.total.backward()
            if clip:
                clip_gradients_per_tensor(self.student.parameters(), clip)
            cancel_last_layer_gradients(self.student, epoch, cfg.optim.freeze_last_layer)
            if keep is None:
                self.optimizer.step()
            else:
                masked_step(self.optimizer, ~keep)
        else:
            loss = terms.total
            if keep is not None:  # x 1 (exact) or x NaN: NaN gradients make GradScaler skip this step
                loss = loss * torch.where(keep, torch.ones_like(loss), torch.full_like(loss, math.nan))
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
                clip_gradients_per_tensor(self.student.parameters(), clip)
            cancel_last_layer_gradients(self.student, epoch, cfg.optim.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        ema_update(self.teacher.parameters(), self.student.parameters(), momentum, keep)
        patch = None if terms.patch is None else terms.patch.detach()
        return StepValues(terms.total.detach(), terms.cls.detach(), patch, diagnostics)

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a deferred-checked step was non-finite (a host sync; call it per log
        window and before anything is saved). With the per-step check there is nothing left to check."""
        if self.guard is not None:
            self.guard.check()

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


def compile_regions(
    mode: str,
    student: DINOModel | SelfPatchModel,
    teacher: DINOModel | SelfPatchModel,
    loss_fn: MultiCropLoss,
    backend: str,
) -> None:
    """torch.compile in place (state-dict keys unchanged). 'blocks': every ViT block (one compiled code object
    shared by all blocks: graphs per crop size and grad mode, not per block), the projection heads and the
    two loss terms; 'full': the student, the teacher and the loss as wholes.

    Stochastic depth stays eager in 'blocks': its per-block drop rate would otherwise be a constant baked
    into each graph (a recompile per block), and eager keeps the drop masks those of an eager run.
    """
    from timm.layers.drop import DropPath

    if mode == "full":
        for module in (student, teacher, loss_fn):
            module.compile(backend=backend, dynamic=False)
        return
    for net in (student, teacher):
        for block in net.backbone.blocks:
            for sub in block.modules():
                if isinstance(sub, DropPath):
                    sub.forward = torch.compiler.disable(sub.forward)  # type: ignore[method-assign,no-untyped-call]
            block.compile(backend=backend, dynamic=False)
        heads = [net.head] if isinstance(net, DINOModel) else [net.c_head, net.p_head]
        for head in heads:
            head.compile(backend=backend, dynamic=False)
    loss_fn.image_loss = torch.compile(loss_fn.image_loss, backend=backend, dynamic=False)  # type: ignore[method-assign]
    loss_fn.patch_loss = torch.compile(loss_fn.patch_loss, backend=backend, dynamic=False)  # type: ignore[method-assign]
