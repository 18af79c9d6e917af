"""DINO's collapse diagnostics for both heads, and the detector that flags a collapsed run.

DINO can collapse in two ways (Caron et al. 2021, section 5.3): every image gets the same one-hot output
(the batch-mean teacher distribution has near-zero entropy), or every image gets a uniform output (each
teacher distribution has entropy near ln K). Centering alone leads to the first, sharpening alone to the
second. Measured on the logits the loss sees, for the image head (`cls`) and, with SelfPatch, the patch
head (`patch`):

* `teacher_entropy`: mean entropy H(P_t) of the teacher distributions, in nats (uniform: ln K);
* `kl`: mean KL(P_t || P_s) between teacher and student on the same views (0 when both collapse alike);
* `batch_entropy`: entropy of the batch-mean teacher distribution (one-hot collapse: 0);
* `center_norm`: L2 norm of the head's center;
* `feature_std`: mean per-dimension std of the L2-normalised features fed to the head (about 1/sqrt(d)
  when spread over the sphere, 0 when every image maps to one point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

HEADS = ("cls", "patch")


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@torch.no_grad()
def head_diagnostics(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
    features: torch.Tensor | None = None,
) -> dict[str, float]:
    """The diagnostics of one head; `teacher_logits` and `student_logits` cover the same views, row by row
    (any leading shape, logits last), and `features` are the head's inputs (rows x d)."""
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    student = student_logits.reshape(-1, student_logits.shape[-1])
    p_t = F.softmax((_wide(teacher) - center) / teacher_temp, dim=-1)
    log_p_t = torch.log(p_t.clamp_min(1e-30))
    log_p_s = F.log_softmax(_wide(student) / student_temp, dim=-1)
    entropy = -(p_t * log_p_t).sum(dim=-1)
    kl = (p_t * (log_p_t - log_p_s)).sum(dim=-1)
    mean_p = p_t.mean(dim=0)
    values = {
        "teacher_entropy": float(entropy.mean()),
        "kl": float(kl.mean()),
        "batch_entropy": float(-(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum()),
        "center_norm": float(center.float().norm()),
    }
    if features is not None:
        flat = F.normalize(_wide(features.reshape(-1, features.shape[-1])), dim=-1)
        values["feature_std"] = float(flat.std(dim=0).mean()) if flat.shape[0] > 1 else 0.0
    return values


def step_diagnostics(
    heads: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]],
    teacher_temp: float,
    student_temp: float,
) -> dict[str, float]:
    """`{head: (teacher logits, student logits, center, features)}` -> flat `diag/<head>_<name>` metrics."""
    out: dict[str, float] = {}
    for head, (teacher, student, center, features) in heads.items():
        for name, value in head_diagnostics(teacher, student, center, teacher_temp, student_temp, features).items():
            out[f"diag/{head}_{name}"] = value
    return out


@dataclass(frozen=True)
class Collapse:
    head: str
    mode: str  # "uniform" or "one-hot"
    iteration: int
    ratio: float  # the entropy that gave it away, as a fraction of ln K

    def reason(self) -> str:
        what = "H(P_t)" if self.mode == "uniform" else "H(mean P_t)"
        return (
            f"collapsed ({self.mode} teacher on the {self.head} head at step {self.iteration}: "
            f"{what} = {self.ratio:.3f} ln K)"
        )


@dataclass
class CollapseDetector:
    """Flags a head whose teacher stays near-uniform (H(P_t) > uniform_ratio ln K) or near one-hot
    (H(mean P_t) < onehot_ratio ln K) for `windows` consecutive checks, once `start` steps have passed
    (a random teacher's first outputs are near-uniform)."""

    out_dims: dict[str, int]  # head -> K
    uniform_ratio: float
    onehot_ratio: float
    start: int
    windows: int
    _runs: dict[tuple[str, str], int] = field(default_factory=dict)
    found: Collapse | None = None

    def update(self, iteration: int, metrics: dict[str, float]) -> Collapse | None:
        """The first collapse, when this check confirms it; None otherwise (and after it was reported)."""
        if self.found is not None or iteration < self.start:
            return None
        for head, k in self.out_dims.items():
            log_k = math.log(k)
            entropy, batch = metrics.get(f"diag/{head}_teacher_entropy"), metrics.get(f"diag/{head}_batch_entropy")
            for mode, value in (("uniform", entropy), ("one-hot", batch)):
                if value is None:
                    continue
                ratio = value / log_k
                collapsed = ratio > self.uniform_ratio if mode == "uniform" else ratio < self.onehot_ratio
                key = (head, mode)
                self._runs[key] = self._runs.get(key, 0) + 1 if collapsed else 0
                if self._runs[key] >= self.windows:
                    self.found = Collapse(head, mode, iteration, ratio)
                    return self.found
        return None


def ratios(metrics: dict[str, float], out_dims: dict[str, int], heads: Sequence[str] = HEADS) -> dict[str, float]:
    """Entropies as fractions of ln K (1 = uniform), for logs a person reads."""
    out: dict[str, float] = {}
    for head in heads:
        if head in out_dims:
            for name in ("teacher_entropy", "batch_entropy"):
                value = metrics.get(f"diag/{head}_{name}")
                if value is not None:
                    out[f"diag/{head}_{name}_ratio"] = value / math.log(out_dims[head])
    return out
