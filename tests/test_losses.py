"""Image and patch losses against naive float64 loops; centers follow their EMA."""

from __future__ import annotations

import torch

from trainer.losses import MultiCropLoss


def _ce(p: torch.Tensor, logits: torch.Tensor, temp: float) -> torch.Tensor:
    return -(p * torch.log_softmax(logits / temp, dim=-1)).sum(-1)


def _naive(
    s_cls: list[torch.Tensor],
    t_cls: list[torch.Tensor],
    s_patch: list[torch.Tensor],
    t_patch: list[torch.Tensor],
    center: torch.Tensor,
    patch_center: torch.Tensor,
    temp: float,
    weight: float,
) -> tuple[float, float, float]:
    """Literal spec 2.6: image pairs (t in {0,1}, v != t), patch pairs (v == v), means of per-pair means."""
    cls_terms, patch_terms = [], []
    for t in range(len(t_cls)):
        q = torch.softmax((t_cls[t] - center) / temp, dim=-1)
        for v in range(len(s_cls)):
            if v == t:
                qp = torch.softmax((t_patch[t] - patch_center) / temp, dim=-1)
                per_patch = [
                    _ce(qp[b, i], s_patch[v][b, i], 0.1) for b in range(qp.shape[0]) for i in range(qp.shape[1])
                ]
                patch_terms.append(torch.stack(per_patch).mean())
            elif t < 2:
                cls_terms.append(torch.stack([_ce(q[b], s_cls[v][b], 0.1) for b in range(q.shape[0])]).mean())
    cls_loss = torch.stack(cls_terms).mean()
    patch_loss = torch.stack(patch_terms).mean()
    return float(cls_loss + weight * patch_loss), float(cls_loss), float(patch_loss)


def test_selfpatch_loss_equals_naive_float64_loop() -> None:
    torch.manual_seed(0)
    batch, k_cls, k_patch, temp = 3, 11, 7, 0.04
    views = [(2, 4), (3, 2)]  # (number of crops, patches per crop) for the global and the local group
    s_cls = [torch.randn(batch, k_cls, dtype=torch.float64) for _ in range(5)]
    t_cls = [torch.randn(batch, k_cls, dtype=torch.float64) for _ in range(5)]
    s_patch = [torch.randn(batch, n, k_patch, dtype=torch.float64) for count, n in views for _ in range(count)]
    t_patch = [torch.randn(batch, n, k_patch, dtype=torch.float64) for count, n in views for _ in range(count)]
    loss = MultiCropLoss(k_cls, k_patch, patch_weight=0.1).double()
    loss.center.normal_()
    loss.patch_center.normal_()
    expected = _naive(s_cls, t_cls, s_patch, t_patch, loss.center.clone(), loss.patch_center.clone(), temp, 0.1)

    def group(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(chunks[:2]), torch.cat(chunks[2:])]

    terms = loss(torch.cat(s_cls), torch.cat(t_cls), temp, batch, group(s_patch), group(t_patch))
    assert terms.patch is not None
    torch.testing.assert_close(
        (float(terms.total), float(terms.cls), float(terms.patch)), expected, rtol=1e-12, atol=1e-12
    )


def test_dino_loss_uses_only_global_teacher_views() -> None:
    torch.manual_seed(1)
    batch, k = 4, 9
    s = [torch.randn(batch, k, dtype=torch.float64) for _ in range(6)]
    t = [torch.randn(batch, k, dtype=torch.float64) for _ in range(2)]
    loss = MultiCropLoss(k).double()
    terms = loss(torch.cat(s), torch.cat(t), 0.07, batch)
    naive = torch.stack(
        [
            torch.stack([_ce(torch.softmax(t[a][b] / 0.07, -1), s[v][b], 0.1) for b in range(batch)]).mean()
            for a in range(2)
            for v in range(6)
            if v != a
        ]
    ).mean()
    assert terms.patch is None
    torch.testing.assert_close(float(terms.total), float(naive), rtol=1e-12, atol=1e-12)


def test_centers_follow_their_ema_over_all_teacher_crops_and_patches() -> None:
    torch.manual_seed(2)
    batch, k_cls, k_patch = 2, 5, 3
    loss = MultiCropLoss(k_cls, k_patch, center_momentum=0.9).double()
    t_cls = torch.randn(4 * batch, k_cls, dtype=torch.float64)
    t_patch = [
        torch.randn(2 * batch, 9, k_patch, dtype=torch.float64),
        torch.randn(2 * batch, 4, k_patch, dtype=torch.float64),
    ]
    center, patch_center = torch.zeros(1, k_cls, dtype=torch.float64), torch.zeros(1, k_patch, dtype=torch.float64)
    for _ in range(3):
        loss.update_centers(t_cls, t_patch)
        center = 0.9 * center + 0.1 * t_cls.mean(0, keepdim=True)
        all_patches = torch.cat([t.reshape(-1, k_patch) for t in t_patch])  # token-weighted, 2*9 + 2*4 per image
        patch_center = 0.9 * patch_center + 0.1 * all_patches.mean(0, keepdim=True)
        torch.testing.assert_close(loss.center, center)
        torch.testing.assert_close(loss.patch_center, patch_center)


def test_loss_uses_the_center_before_its_update() -> None:
    torch.manual_seed(3)
    loss = MultiCropLoss(6)
    s, t = torch.randn(6, 6), torch.randn(4, 6)
    before = MultiCropLoss(6)
    expected = before(s, t, 0.04, 2).total
    torch.testing.assert_close(loss(s, t, 0.04, 2).total, expected)
    assert not torch.equal(loss.center, torch.zeros(1, 6))
