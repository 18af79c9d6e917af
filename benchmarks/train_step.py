"""Training-step throughput of DINO vs DINO+SelfPatch, measured in one run so the ratio is fair.

Every case runs in a fresh subprocess (so peak memory is its own) on synthetic crops of the right sizes:
this measures the optimisation step (both networks, loss, backward, AdamW, EMA), not data loading.

    python benchmarks/train_step.py                   # CPU: tiny preset and ViT-S/16 @224, batch 8
    python benchmarks/train_step.py --device cuda     # GPU: ViT-S/16 @224, batch 64, bf16, with MFU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peak (FLOP/s) used for MFU.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def cases(device: str) -> list[tuple[str, str, list[str]]]:
    """(label, preset, overrides); every label is measured for both methods."""
    if device == "cuda":
        gpu = ["device=cuda", "precision=bf16", "optim.batch_size_per_gpu=64"]
        return [("ViT-S/16 224 b64 bf16", "selfpatch_vits16", gpu)]
    cpu = ["device=cpu", "precision=fp32"]
    return [
        ("tiny preset b64", "tiny_cpu", cpu),
        ("ViT-S/16 224 b8", "selfpatch_vits16", [*cpu, "optim.batch_size_per_gpu=8"]),
    ]


def measure(preset: str, overrides: list[str], warmup: int, steps: int) -> dict[str, float]:
    """Run in a child process: time `steps` optimisation steps after `warmup` ones."""
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
    kwargs = {"epoch": 1, "lr": 1e-4, "weight_decay": 0.04, "momentum": 0.996, "temp": 0.04}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        engine.step(crops, **kwargs)
    flops = float("nan")
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            engine.step(crops, **kwargs)
        flops = float(counter.get_total_flops())
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step(crops, **kwargs)
    sync()
    step_s = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name()
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of this process
        name = "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    return {
        "step_s": step_s,
        "img_per_s": batch / step_s,
        "peak_mb": peak_mb,
        "flops_per_step": flops,
        "mfu": flops / step_s / peak if device.type == "cuda" else float("nan"),
        "threads": torch.get_num_threads(),
        "device": name,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 5 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 CPU, 5 GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (20 if args.device == "cuda" else 5)
    warmup = args.warmup or (5 if args.device == "cuda" else 2)

    if args.child:  # one measurement, printed as JSON for the parent
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["preset"], spec["overrides"], warmup, steps)))
        return 0

    rows = []
    for label, preset, overrides in cases(args.device):
        for method in ("dino", "selfpatch"):
            spec = {"preset": preset, "overrides": [*overrides, f"method={method}"]}
            cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(steps), "--warmup", str(warmup)]
            out = subprocess.run([*cmd, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append({"case": label, "method": method, **json.loads(out.stdout.strip().splitlines()[-1])})

    columns = ("step s", "img/s", "peak MiB", "TFLOP/step", "MFU")
    header = f"{'case':24s} {'method':10s} " + " ".join(f"{c:>10s}" for c in columns)
    print(f"device: {rows[0]['device']}, torch threads: {rows[0]['threads']}, {steps} timed steps after {warmup}")
    print(header)
    print("-" * len(header))
    for r in rows:
        tflop = r["flops_per_step"] / 1e12
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] == r["mfu"] else "-"
        tf = f"{tflop:.2f}" if tflop == tflop else "-"
        cells = (f"{r['step_s']:.3f}", f"{r['img_per_s']:.1f}", f"{r['peak_mb']:.0f}", tf, mfu)
        print(f"{r['case']:24s} {r['method']:10s} " + " ".join(f"{c:>10s}" for c in cells))
    print()
    for label in dict.fromkeys(r["case"] for r in rows):
        dino = next(r for r in rows if r["case"] == label and r["method"] == "dino")
        sp = next(r for r in rows if r["case"] == label and r["method"] == "selfpatch")
        ratio = sp["step_s"] / dino["step_s"]
        print(f"{label}: SelfPatch/DINO step-time ratio {ratio:.2f}x (spec FLOP estimate ~1.5x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
