"""DINO's image-level loss and SelfPatch's patch-level loss, each with its EMA center (spec 1.4, 2.6).

Both are vectorised: the cross-entropies of all (teacher view, student view) pairs come from one matrix
product, and the patch loss loops only over crop-size groups. The patch loss works on B x N x K logits
(memory-bound), so it runs chunk by chunk of patches and keeps nothing of that size for the backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 logits to fp32 for softmax and sums (what autocast does for softmax); others unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


#: Logit elements per chunk of the patch loss: about 4 MB of fp32 per temporary on CPU, so a chunk's softmaxes
#: stay in cache; on GPUs a chunk is larger, so kernel launches stay few.
PATCH_CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**25}


class _PatchCrossEntropy(torch.autograd.Function):
    """Per-row -sum_k softmax((t - c)/temp_t)_k * log_softmax(s/temp_s)_k over (R, K) logits, chunk by chunk.

    The forward runs the same ops as the unchunked formula, row by row, so the values are the same. While a
    chunk's softmaxes are in cache it also writes the chunk's gradient up to the per-row factor, log_softmax's
    own backward: d ce_r / d s_r = (softmax(s_r/temp_s) * sum_k p_rk - p_r) / temp_s. That one (R, K) buffer
    is all it keeps (the unchunked formula keeps the targets and the log-probabilities), and the backward
    only scales it in place.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        center: torch.Tensor,
        temp: float,
        student_temp: float,
        chunk: int,
        wants_grad: bool,
    ) -> torch.Tensor:
        grad = torch.empty(student.shape, dtype=_wide(student).dtype, device=student.device) if wants_grad else None
        out = []
        for i, (s, t) in enumerate(zip(torch.split(student, chunk), torch.split(teacher, chunk), strict=True)):
            targets = F.softmax((_wide(t) - center) / temp, dim=-1)
            log_probs = F.log_softmax(_wide(s) / student_temp, dim=-1)
            out.append(-(targets * log_probs).sum(dim=-1))
            if grad is not None:
                g = grad[i * chunk : (i + 1) * chunk]
                torch.exp(log_probs, out=g)
                g.mul_(targets.sum(dim=-1, keepdim=True)).sub_(targets)
        ctx.grad = grad  # type: ignore[attr-defined]
        ctx.student_temp, ctx.dtype = student_temp, student.dtype  # type: ignore[attr-defined]
        return torch.cat(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_rows: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, None, None, None]:
        grad: torch.Tensor | None = ctx.grad  # type: ignore[attr-defined]
        if grad is None:
            raise RuntimeError("the patch loss keeps one gradient buffer: backward through it runs only once")
        ctx.grad = None  # type: ignore[attr-defined]
        grad.mul_((grad_rows / ctx.student_temp).unsqueeze(-1))  # type: ignore[attr-defined]
        return grad.to(ctx.dtype), None, None, None, None, None, None  # type: ignore[attr-defined]


def patch_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    temp: float,
    student_temp: float,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Per-patch soft-target cross-entropy of (..., K) logits, shape (...): the patch loss before its means.

    Equals -(softmax((teacher - center)/temp) * log_softmax(student/student_temp)).sum(-1) without holding
    any (..., K) intermediate beyond one chunk; the teacher side gets no gradient.
    """
    classes = student.shape[-1]
    if chunk_elements is None:
        chunk_elements = PATCH_CHUNK_ELEMENTS.get(student.device.type, PATCH_CHUNK_ELEMENTS["cuda"])
    rows = max(1, chunk_elements // classes)
    flat_s, flat_t = student.reshape(-1, classes), teacher.detach().reshape(-1, classes)
    wants_grad = torch.is_grad_enabled() and student.requires_grad
    ce: torch.Tensor = _PatchCrossEntropy.apply(flat_s, flat_t, center.detach(), temp, student_temp, rows, wants_grad)
    return ce.view(student.shape[:-1])


class LossTerms(NamedTuple):
    total: torch.Tensor
    cls: torch.Tensor
    patch: torch.Tensor | None


class MultiCropLoss(nn.Module):
    """L = L_cls + patch_weight * L_patch, with the centers `center` and (SelfPatch) `patch_center`.

    Image term: each of the first `n_target_views` teacher views against every *other* student view.
    Patch term: teacher and student on the *same* view, patch by patch; per-view means, then their mean.
    Logits are crop-major: rows [v*B, (v+1)*B) belong to view v.
    """

    center: torch.Tensor
    patch_center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int | None = None,
        *,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        patch_weight: float = 0.1,
        n_target_views: int = 2,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.patch_weight = patch_weight
        self.n_target_views = n_target_views
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.has_patch_term = patch_out_dim is not None
        if patch_out_dim is not None:
            self.register_buffer("patch_center", torch.zeros(1, patch_out_dim))

    def image_loss(self, student: torch.Tensor, teacher: torch.Tensor, temp: float, batch: int) -> torch.Tensor:
        n_student, n_target = student.shape[0] // batch, self.n_target_views
        targets = F.softmax((_wide(teacher[: n_target * batch]) - self.center) / temp, dim=-1).detach()
        log_probs = F.log_softmax(_wide(student) / self.student_temp, dim=-1)
        # ce[t, v] = mean over the batch of -sum_k p_t log p_v
        ce = -(targets.reshape(n_target, -1) @ log_probs.reshape(n_student, -1).t()) / batch
        pairs = ~torch.eye(n_target, n_student, dtype=torch.bool, device=ce.device)
        return ce[pairs].mean()

    def patch_loss(
        self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], temp: float, batch: int
    ) -> torch.Tensor:
        """Groups of (V_g*B, N_g, K) logits; the teacher may cover only a prefix of the student's groups/views."""
        per_view = []
        for s_group, t_group in zip(student, teacher, strict=False):
            # the whole group when the teacher saw all its views: a slice would cost a full-size gradient copy
            s_views = s_group if t_group.shape[0] == s_group.shape[0] else s_group[: t_group.shape[0]]
            ce = patch_cross_entropy(s_views, t_group, self.patch_center, temp, self.student_temp)  # (V_g*B, N_g)
            per_view.append(ce.reshape(-1, batch * ce.shape[-1]).mean(dim=1))
        return torch.cat(per_view).mean()

    def forward(
        self,
        student_cls: torch.Tensor,
        teacher_cls: torch.Tensor,
        temp: float,
        batch: int,
        student_patch: Sequence[torch.Tensor] = (),
        teacher_patch: Sequence[torch.Tensor] = (),
    ) -> LossTerms:
        """The loss terms with the current centers; then both centers take their EMA step."""
        cls_term = self.image_loss(student_cls, teacher_cls, temp, batch)
        patch_term = None
        total = cls_term
        if self.has_patch_term and teacher_patch:
            patch_term = self.patch_loss(student_patch, teacher_patch, temp, batch)
            total = cls_term + self.patch_weight * patch_term
        self.update_centers(teacher_cls, teacher_patch)
        return LossTerms(total, cls_term, patch_term)

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_patch: Sequence[torch.Tensor] = ()) -> None:
        """center <- m*center + (1-m)*mean over all teacher crops (and patches), across processes."""
        sums = [_wide(teacher_cls).sum(dim=0)]
        counts = [teacher_cls.shape[0]]
        if self.has_patch_term and teacher_patch:
            sums.append(torch.stack([_wide(t).sum(dim=(0, 1)) for t in teacher_patch]).sum(dim=0))
            counts.append(sum(t.shape[0] * t.shape[1] for t in teacher_patch))
        flat = torch.cat(sums)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)  # one collective for both centers
            world = dist.get_world_size()
        parts = torch.split(flat, [s.numel() for s in sums])
        buffers = [self.center, self.patch_center] if len(parts) > 1 else [self.center]
        for buffer, total, count in zip(buffers, parts, counts, strict=True):
            buffer.mul_(self.center_momentum).add_(
                total.view_as(buffer) / (count * world), alpha=1 - self.center_momentum
            )
