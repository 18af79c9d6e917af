"""Training-step throughput of DINO vs DINO+SelfPatch, eager vs compiled, fused vs unfused, in one run.

Every measurement runs in a fresh subprocess (so peak memory and compile caches in memory are its own) on
synthetic crops of the right sizes: this measures the optimisation step (both networks, loss, backward,
optimizer, EMA), not data loading. Ratios are against the `baseline` variant measured in the same run:

  baseline   eager, torch's default optimizer kernels (foreach on CUDA, a per-tensor loop on CPU) and a
             host check of the loss every step: the trainer before `optim.fused` and the deferred check
  fused      eager, the defaults now: fused AdamW, the finite check deferred to the device (no host sync)
  blocks     fused + compile=blocks (regional: each ViT block once, the heads, the loss terms)
  full       fused + compile=full (GPU runs only, or --full)

FLOPs are counted with torch.utils.flop_counter on an eager step (compiling changes kernels, not FLOPs);
MFU needs a known peak, so GPU only.

    python benchmarks/train_step.py --quick           # CPU, ~3 min: tiny preset, batch 64
    python benchmarks/train_step.py                   # CPU: tiny preset and ViT-S/16 @224, batch 8
    python benchmarks/train_step.py --device cuda     # GPU: ViT-S/16 @224, batch 64, bf16 and fp16, MFU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Dense bf16/fp16 tensor-core peak (FLOP/s) used for MFU.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def variants(device: str, full: bool) -> dict[str, list[str]]:
    """Variant name -> config overrides; the first is the baseline of the ratios."""
    default_kernels = "foreach" if device == "cuda" else "off"  # what torch.optim.AdamW() picks by itself
    out = {
        "baseline": [f"optim.fused={default_kernels}", "optim.finite_check=step", "compile=off"],
        "fused": ["optim.fused=auto", "optim.finite_check=deferred", "compile=off"],
        "blocks": ["optim.fused=auto", "optim.finite_check=deferred", "compile=blocks"],
    }
    if full or device == "cuda":
        out["full"] = ["optim.fused=auto", "optim.finite_check=deferred", "compile=full"]
    return out


def cases(device: str, quick: bool) -> list[tuple[str, str, list[str]]]:
    """(label, preset, overrides); every label is measured for both methods and every variant."""
    if device == "cuda":
        gpu = ["device=cuda", "optim.batch_size_per_gpu=64"]
        return [
            ("ViT-S/16 224 b64 bf16", "selfpatch_vits16", [*gpu, "precision=bf16"]),
            ("ViT-S/16 224 b64 fp16+scaler", "selfpatch_vits16", [*gpu, "precision=auto"]),  # the official default
        ]
    cpu = ["device=cpu", "precision=fp32"]
    tiny = ("tiny preset b64", "tiny_cpu", cpu)
    return [tiny] if quick else [tiny, ("ViT-S/16 224 b8", "selfpatch_vits16", [*cpu, "optim.batch_size_per_gpu=8"])]


def measure(preset: str, overrides: list[str], warmup: int, steps: int) -> dict[str, Any]:
    """Run in a child process: time `steps` optimisation steps after `warmup` ones (which include compiling)."""
    import torch

    from trainer.distributed import DistInfo
    from trainer.engine import Engine
    from trainer.presets import load_config
    from trainer.train import resolve_precision

    cfg = load_config(preset, overrides)
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    engine = Engine.build(cfg, device, resolve_precision(cfg.precision, device), DistInfo())
    batch, c = cfg.optim.batch_size_per_gpu, cfg.crops
    crops = [torch.randn(batch, 3, c.global_size, c.global_size, device=device) for _ in range(2)]
    crops += [torch.randn(batch, 3, c.local_size, c.local_size, device=device) for _ in range(c.local_number)]
    kwargs: dict[str, Any] = {"epoch": 1, "lr": 1e-4, "weight_decay": 0.04, "momentum": 0.996, "temp": 0.04}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    engine.step(crops, **kwargs, iteration=0)
    sync()
    first_s = time.perf_counter() - start  # compiles, when compiled
    for i in range(1, warmup):
        engine.step(crops, **kwargs, iteration=i)
    flops = float("nan")
    if cfg.compile == "off":  # FLOPs of the same mathematics; counting under compile is not supported
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            engine.step(crops, **kwargs, iteration=warmup)
        flops = float(counter.get_total_flops())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for i in range(steps):
        engine.step(crops, **kwargs, iteration=warmup + 1 + i)
    sync()
    step_s = (time.perf_counter() - start) / steps
    engine.check_finite()
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name()
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of this process
        name = "cpu"
    return {
        "step_s": step_s,
        "first_step_s": first_s,
        "img_per_s": batch / step_s,
        "batch": batch,
        "peak_mb": peak_mb,
        "flops_per_step": flops,
        "threads": torch.get_num_threads(),
        "device": name,
        "torch": torch.__version__,
    }


def measure_optimizer(preset: str, overrides: list[str], steps: int) -> dict[str, float]:
    """Run in a child process: one student's optimizer step alone (random gradients) for every `optim.fused`
    kernel, interleaved step by step so the machine's load hits all alike; median seconds per step."""
    import statistics

    import torch

    from trainer.models.wrapper import build_model
    from trainer.optim import build_optimizer, set_schedule_values
    from trainer.presets import load_config

    cfg = load_config(preset, overrides)
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    default = "foreach" if device.type == "cuda" else "off"  # what torch.optim.AdamW() picks by itself
    kinds = {"baseline": default, "foreach": "foreach", "fused": "fused"}
    if default == "foreach":
        del kinds["foreach"]
    students, optimizers = {}, {}
    for name, kind in kinds.items():
        students[name] = build_model(cfg, student=True).to(device)
        optimizers[name] = build_optimizer(cfg.optim.model_copy(update={"fused": kind}), students[name], device)
        for param in students[name].parameters():
            param.grad = torch.randn_like(param) * 1e-3
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(steps + 1):  # the first builds the optimizer state
        for name in kinds:
            set_schedule_values(optimizers[name], 1e-4, 0.04)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    params = sum(p.numel() for p in students["baseline"].parameters() if p.requires_grad)
    return {"params": float(params)} | {name: statistics.median(t[1:]) for name, t in times.items()}


def fill_derived(rows: list[dict[str, Any]]) -> None:
    """FLOPs of compiled rows from their eager twin, MFU where the peak is known, ratios to the baseline."""
    for r in rows:
        same = [o for o in rows if o["case"] == r["case"] and o["method"] == r["method"]]
        if r["flops_per_step"] != r["flops_per_step"]:
            r["flops_per_step"] = next((o["flops_per_step"] for o in same if o["variant"] == "baseline"), float("nan"))
        peak = next((v for k, v in PEAK_BF16.items() if k in r["device"]), float("nan"))
        r["mfu"] = r["flops_per_step"] / r["step_s"] / peak
        base = next(o for o in same if o["variant"] == "baseline")
        r["speedup"] = base["step_s"] / r["step_s"]


def print_table(rows: list[dict[str, Any]], steps: int, warmup: int, rounds: int) -> None:
    first = rows[0]
    print(f"device: {first['device']}, torch {first['torch']}, threads: {first['threads']}")
    print(f"{steps} timed steps after {warmup} (the first compiles, when compiled); fastest of {rounds} round(s)")
    columns = ("s/step", "img/s", "vs base", "peak MiB", "GFLOP/img", "MFU", "1st step s")
    header = f"{'case':30s} {'method':10s} {'variant':9s} " + " ".join(f"{c:>10s}" for c in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        gflop = r["flops_per_step"] / r["batch"] / 1e9
        cells = (
            f"{r['step_s']:.3f}",
            f"{r['img_per_s']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['peak_mb']:.0f}",
            f"{gflop:.2f}" if gflop == gflop else "-",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] == r["mfu"] else "-",
            f"{r['first_step_s']:.1f}",
        )
        print(f"{r['case']:30s} {r['method']:10s} {r['variant']:9s} " + " ".join(f"{c:>10s}" for c in cells))
    print()
    for label in dict.fromkeys(r["case"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            pick = {r["method"]: r for r in rows if r["case"] == label and r["variant"] == variant}
            if {"dino", "selfpatch"} <= set(pick):
                dino, sp = pick["dino"], pick["selfpatch"]
                flop_ratio = sp["flops_per_step"] / dino["flops_per_step"]
                print(
                    f"{label}, {variant}: SelfPatch/DINO step time {sp['step_s'] / dino['step_s']:.2f}x, "
                    f"counted FLOPs {flop_ratio:.2f}x (spec estimate ~1.5x)"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="CPU tiny preset only, few steps (~3 min on 2 cores)")
    parser.add_argument("--full", action="store_true", help="also compile=full on CPU (always on GPU)")
    parser.add_argument("--variants", default=None, help="comma-separated subset, e.g. baseline,fused")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 5 CPU, 3 quick, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 CPU, 5 GPU)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every row this many times, interleaved; keep the fastest"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    steps = args.steps or (20 if gpu else 3 if args.quick else 5)
    warmup = args.warmup or (5 if gpu else 2)

    if args.child:  # one measurement, printed as JSON for the parent
        spec = json.loads(args.child)
        if spec.get("optimizer_only"):
            print(json.dumps(measure_optimizer(spec["preset"], spec["overrides"], 10)))
        else:
            print(json.dumps(measure(spec["preset"], spec["overrides"], warmup, steps)))
        return 0

    chosen = variants(args.device, args.full)
    if args.variants:
        names = args.variants.split(",")
        chosen = {k: v for k, v in chosen.items() if k in names or k == "baseline"}
    best: dict[tuple[str, str, str], dict[str, Any]] = {}  # interleaved rounds: load from others hits all rows
    for _ in range(args.rounds):
        for label, preset, overrides in cases(args.device, args.quick):
            for method in ("dino", "selfpatch"):
                for variant, extra in chosen.items():
                    spec = {"preset": preset, "overrides": [*overrides, f"method={method}", *extra]}
                    cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(steps)]
                    cmd += ["--warmup", str(warmup), "--child", json.dumps(spec)]
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                    if out.returncode != 0:
                        print(out.stderr[-3000:], file=sys.stderr)
                        return 1
                    row = {"case": label, "method": method, "variant": variant}
                    row |= json.loads(out.stdout.splitlines()[-1])
                    print(f"  measured {label} / {method} / {variant}: {row['step_s']:.3f} s/step", file=sys.stderr)
                    key = (label, method, variant)
                    if key not in best or row["step_s"] < best[key]["step_s"]:
                        best[key] = row
    rows = list(best.values())
    fill_derived(rows)
    print_table(rows, steps, warmup, args.rounds)
    print()
    print("optimizer step alone (student parameters, random gradients; median of 10, kernels interleaved):")
    for label, preset, overrides in cases(args.device, args.quick)[-1:]:  # the largest model
        spec = {"preset": preset, "overrides": [*overrides, "method=selfpatch"], "optimizer_only": True}
        cmd = [sys.executable, __file__, "--device", args.device, "--child", json.dumps(spec)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        times = json.loads(out.stdout.splitlines()[-1])
        params = times.pop("params")
        base = times["baseline"]
        cells = ", ".join(f"{name} {1000 * t:.1f} ms ({base / t:.2f}x)" for name, t in times.items())
        print(f"  {label}, SelfPatch student, {params / 1e6:.1f}M parameters: {cells}")
        rows.append({"case": label, "method": "selfpatch", "variant": "optimizer-only", "params": params, **times})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
