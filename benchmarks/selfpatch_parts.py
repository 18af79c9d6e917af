"""The SelfPatch-specific parts, earlier formulation vs current, measured in one run so the ratios are fair.

"Parts" = the teacher's positive matching and aggregation (match=True, no grad), the student's aggregation
(forward + backward) and the patch loss over B x N x K logits (forward + backward), over every crop-size
group of one step. The patch head's MLP is the same in both and compute-bound, so it is left out: the
logits are given. The earlier formulation is kept here as the baseline: the neighbour similarity from a
(B, N, 8, C) gather, keys gathered then concatenated, one LayerNorm over [image; patches], and the
unchunked soft-target cross-entropy. Times: both variants alternate in one process (a busy machine slows
both alike); `--threads 1` steadies them on a shared machine. Peak memory: a fresh process per variant, on
CPU the growth of the peak RSS over the inputs (with a fixed glibc mmap threshold, so freed tensors leave
the RSS), on CUDA the allocator's peak over the inputs.

Sequence packing (`--packing`): the backbone's blocks over all crops of an image as one sequence with a
block-diagonal attention mask (DINOv2-style) vs one pass per crop size (the current multi-crop batching).

    python benchmarks/selfpatch_parts.py --breakdown --threads 1   # CPU: tiny preset and ViT-S/16, B=8
    python benchmarks/selfpatch_parts.py --packing        # also sequence packing (CPU: ViT-S/16, B=8)
    python benchmarks/selfpatch_parts.py --device cuda    # GPU: ViT-S/16 shapes, B=64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("earlier", "current")  # the first is the baseline of the ratios


@dataclass(frozen=True)
class Case:
    label: str
    batch: int
    width: int
    heads: int
    depth: int
    out_dim: int
    groups: tuple[tuple[int, int], ...]  # (crops, grid side) per crop-size group


def cases(device: str) -> list[Case]:
    vits = ((2, 14), (8, 6))  # 2 x 224 px and 8 x 96 px crops at patch 16
    if device == "cuda":
        return [Case("ViT-S/16 B=64", 64, 384, 6, 12, 4096, vits)]
    return [
        Case("tiny preset B=64", 64, 128, 4, 4, 512, ((2, 8), (2, 4))),  # configs/tiny_cpu.yaml
        Case("ViT-S/16 B=8", 8, 384, 6, 12, 4096, vits),
    ]


# ---------------------------------------------------------------------------------------------------------
# The earlier formulation (the baseline)


def earlier_patch_loss(student: Any, teacher: Any, center: Any, temp: float, student_temp: float, batch: int) -> Any:
    import torch
    import torch.nn.functional as F

    per_view = []
    for s_group, t_group in zip(student, teacher, strict=False):
        targets = F.softmax((t_group - center) / temp, dim=-1).detach()
        log_probs = F.log_softmax(s_group[: t_group.shape[0]] / student_temp, dim=-1)
        ce = -(targets * log_probs).sum(dim=-1)
        per_view.append(ce.reshape(-1, batch * ce.shape[-1]).mean(dim=1))
    return torch.cat(per_view).mean()


def earlier_aggregation(head: Any, x: Any, grid: tuple[int, int], match: bool) -> tuple[Any, Any]:
    import torch
    import torch.nn.functional as F

    batch, n_patches, dim = x.shape
    image = head.cls_token.expand(batch, -1, -1)
    if not match:
        for block in head.blocks:
            image = block(x, image)
        out = head.norm(torch.cat([image, x], dim=1))
        return out[:, 0], out[:, 1:]
    index, valid = head.neighbours(grid, x.device)
    x_norm = F.normalize(x, dim=-1)
    similarity = torch.einsum("bnmc,bnc->bnm", x_norm[:, index], x_norm)
    if valid is not None:
        similarity = similarity.masked_fill(~valid, float("-inf"))
    top = similarity.topk(head.k, dim=-1).indices
    chosen = index.expand(batch, -1, -1).gather(2, top)
    rows = (chosen + torch.arange(batch, device=x.device).view(-1, 1, 1) * n_patches).reshape(-1)
    summary = head.cls_token.expand(batch * n_patches, -1, -1)
    for block in head.blocks:
        keys, values = block.key_values(x)
        image = block.attend(image, keys, values)
        pos_keys = keys.reshape(-1, dim)[rows].view(batch * n_patches, head.k, dim)
        pos_values = values.reshape(-1, dim)[rows].view(batch * n_patches, head.k, dim)
        summary = block.attend(summary, pos_keys, pos_values)
    out = head.norm(torch.cat([image, summary.reshape(batch, n_patches, dim)], dim=1))
    return out[:, 0], out[:, 1:]


# ---------------------------------------------------------------------------------------------------------
# Child processes


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure_parts(case: Case, variant: str, device_name: str, reps: int, part: str = "all") -> dict[str, Any]:
    """`part` (all, aggregation or loss) of one case. variant 'earlier' or 'current': the peak memory of one
    iteration over the inputs (a fresh process per variant). variant 'both': `reps` timed iterations of
    each, alternating, so a busy machine slows both alike."""
    import torch

    from trainer.losses import MultiCropLoss
    from trainer.models.selfpatch import AggregationHead

    device = torch.device(device_name)
    torch.manual_seed(0)
    head = AggregationHead(case.width, case.heads, k=4, window=3, border="wrap").to(device)
    teacher_head = AggregationHead(case.width, case.heads, k=4, window=3, border="wrap").to(device)
    teacher_head.load_state_dict(head.state_dict())
    loss = MultiCropLoss(16, case.out_dim).to(device)
    loss.patch_center.normal_(std=0.1)
    b = case.batch
    x_t = [torch.randn(v * b, g * g, case.width, device=device) for v, g in case.groups]
    x_s = [torch.randn(v * b, g * g, case.width, device=device, requires_grad=True) for v, g in case.groups]
    logits_t = [torch.randn(v * b, g * g, case.out_dim, device=device) for v, g in case.groups]
    logits_s = [torch.randn(v * b, g * g, case.out_dim, device=device, requires_grad=True) for v, g in case.groups]
    weights = [torch.randn(v * b, g * g, case.width, device=device) for v, g in case.groups]
    grids = [(g, g) for _, g in case.groups]

    def iteration(earlier: bool) -> float:
        total = torch.zeros((), device=device)
        patch = torch.zeros((), device=device)
        if part in ("all", "aggregation"):
            total = aggregation(total, earlier)
        if part in ("all", "loss"):
            if earlier:
                patch = earlier_patch_loss(logits_s, logits_t, loss.patch_center, 0.04, 0.1, b)
            else:
                patch = loss.patch_loss(logits_s, logits_t, 0.04, b)
        torch.autograd.backward(total * 0 + patch)
        for t in [*x_s, *logits_s, *head.parameters()]:
            t.grad = None
        return float(patch)

    def aggregation(total: Any, earlier: bool) -> Any:
        with torch.no_grad():
            for x, grid in zip(x_t, grids, strict=True):
                out = earlier_aggregation(teacher_head, x, grid, True) if earlier else teacher_head(x, grid, True)
                total = total + out[1].sum()
        for x, grid, w in zip(x_s, grids, weights, strict=True):
            image, patches = earlier_aggregation(head, x, grid, False) if earlier else head(x, grid, False)
            total = total + (patches * w).sum() + image.sum()
        return total

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    logits = [*logits_t, *logits_s] if part != "aggregation" else []
    info: dict[str, Any] = {
        "logits_mb": sum(t.numel() * t.element_size() for t in logits) / 2**20,
        "threads": torch.get_num_threads(),
    }
    if variant != "both":
        sync()
        if device.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base_rss = _rss_mb()
        value = iteration(variant == "earlier")
        sync()
        if device.type == "cuda":
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
        return {**info, "peak_mb": peak_mb, "patch_loss": value}
    values = {v: iteration(v == "earlier") for v in VARIANTS}  # warm-up
    return {
        **info,
        "times_ms": alternate({v: partial(iteration, v == "earlier") for v in VARIANTS}, reps, sync),
        "patch_loss": values,
    }


def alternate(runs: dict[str, Any], reps: int, sync: Any) -> dict[str, list[float]]:
    """`reps` timed calls of each function (ms), in alternating order."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            runs[name]()
            sync()
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def measure_packing(case: Case, device_name: str, reps: int) -> dict[str, Any]:
    """The backbone blocks (no grad) over all crops: one pass per crop size ('per-size') or the crops of
    each image packed into one sequence with a block-diagonal mask ('packed'), alternating; and the max
    |difference| of the packed outputs to the per-size ones."""
    import torch

    from trainer.config import ModelConfig
    from trainer.models.vit import build_backbone

    device = torch.device(device_name)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vit_small", embed_dim=case.width, num_heads=case.heads, depth=case.depth)
    vit = build_backbone(cfg, "selfpatch", 224, drop_path_rate=0.0).to(device).eval()
    b = case.batch
    tokens = [torch.randn(v * b, g * g, case.width, device=device) for v, g in case.groups]
    lengths = [v * g * g for v, g in case.groups]  # tokens per image in each group

    def per_size() -> list[Any]:
        return [vit.blocks(t) for t in tokens]

    # packed: (B, sum of all crops' tokens, C), crop-major inside each image, with one mask for all images
    packed_in = torch.cat(
        [
            t.view(v, b, -1, case.width).transpose(0, 1).reshape(b, n, case.width)
            for t, (v, _), n in zip(tokens, case.groups, lengths, strict=True)
        ],
        dim=1,
    )
    crop_ids = torch.cat(
        [torch.arange(v, device=device).repeat_interleave(g * g) + 100 * i for i, (v, g) in enumerate(case.groups)]
    )
    mask = (crop_ids[:, None] == crop_ids[None, :])[None, None]

    def packed() -> Any:
        x = packed_in
        for block in vit.blocks:
            x = block(x, attn_mask=mask)
        return x

    def unpack(x: Any) -> list[Any]:
        out, start = [], 0
        for (v, _), n in zip(case.groups, lengths, strict=True):
            part = x[:, start : start + n].reshape(b, v, n // v, case.width).transpose(0, 1)
            out.append(part.reshape(v * b, n // v, case.width))
            start += n
        return out

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        reference = per_size()
        diff = max(float((g - r).abs().max()) for g, r in zip(unpack(packed()), reference, strict=True))
        times = alternate({"per-size": per_size, "packed": packed}, reps, sync)
    return {"times_ms": times, "max_abs_diff": diff, "threads": torch.get_num_threads()}


THREADS = 0  # torch threads in the child processes (0: torch's default), from --threads


def run_child(kind: str, case: Case, variant: str, device: str, reps: int, part: str = "all") -> dict[str, Any]:
    fields = {"kind": kind, "case": asdict(case), "variant": variant, "device": device, "reps": reps, "part": part}
    spec = json.dumps({**fields, "threads": THREADS})
    # memory runs: a fixed mmap threshold, so glibc maps every large tensor on its own and unmaps it when
    # freed and the peak RSS follows the live tensors, not what the heap kept from earlier frees (timing
    # runs keep the default: fresh pages for every tensor would slow both variants alike)
    env = dict(os.environ)
    if variant != "both":
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**16)
    cmd = [sys.executable, __file__, "--child", spec]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {case.label} {variant} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def print_rows(label: str, times: dict[str, list[float]], extra: list[str]) -> None:
    """Table rows: min / median time of each variant and its speed-up over the first (the baseline)."""
    fastest = {v: min(t) for v, t in times.items()}
    median = {v: statistics.median(t) for v, t in times.items()}
    base = next(iter(times))
    for (v, _), more in zip(times.items(), extra, strict=True):
        print(
            f"| {label} | {v} | {fastest[v]:.1f} / {median[v]:.1f} | "
            f"{fastest[base] / fastest[v]:.2f}x / {median[base] / median[v]:.2f}x | {more} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=5, help="timed iterations of each variant, alternating")
    parser.add_argument("--packing", action="store_true", help="also measure sequence packing")
    parser.add_argument("--breakdown", action="store_true", help="also the aggregation and the loss on their own")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec["threads"]:
            import torch

            torch.set_num_threads(spec["threads"])
        spec["case"]["groups"] = tuple(tuple(g) for g in spec["case"]["groups"])
        case, variant, device, reps = Case(**spec["case"]), spec["variant"], spec["device"], spec["reps"]
        if spec["kind"] == "parts":
            print(json.dumps(measure_parts(case, variant, device, reps, spec["part"])))
        else:
            print(json.dumps(measure_packing(case, device, reps)))
        return
    global THREADS
    THREADS = args.threads
    print(
        f"SelfPatch parts on {args.device}: teacher matching + aggregation, student aggregation fwd+bwd, "
        f"patch loss fwd+bwd; {args.reps} iterations of each variant, alternating in one process; "
        f"{args.threads or 'default'} threads\n"
    )
    print(
        "| case | part | variant | time (ms), min / median | speed-up, min / median | peak memory over inputs (MB) "
        "| memory ratio | logits (MB) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    parts = ["all", "aggregation", "loss"] if args.breakdown else ["all"]
    for case, part in ((c, p) for c in cases(args.device) for p in parts):
        timing = run_child("parts", case, "both", args.device, args.reps, part)
        loss_values = timing["patch_loss"]
        if abs(loss_values["current"] - loss_values["earlier"]) > 1e-6 * abs(loss_values["earlier"]):
            raise RuntimeError(f"{case.label}: the patch losses differ: {loss_values}")
        peak = {v: run_child("parts", case, v, args.device, 0, part)["peak_mb"] for v in VARIANTS}
        print_rows(
            f"{case.label} | {part}",
            timing["times_ms"],
            [
                f"{peak[v]:.0f} | {peak[v] / max(peak[VARIANTS[0]], 1e-9):.2f} | {timing['logits_mb']:.0f}"
                for v in VARIANTS
            ],
        )
    if args.packing:
        case = cases(args.device)[-1]
        print(f"\nSequence packing, {case.label}: backbone blocks over all crops, no grad\n")
        print("| case | batching | time (ms), min / median | speed-up, min / median | max abs difference to per-size |")
        print("|---|---|---:|---:|---:|")
        packing = run_child("packing", case, "both", args.device, args.reps)
        print_rows(case.label, packing["times_ms"], ["0", f"{packing['max_abs_diff']:.1e}"])
    print(f"\ncommand: python benchmarks/selfpatch_parts.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
