"""What a sweep will cost before it runs: accelerator-hours per trial from measured training throughput.

The throughputs are the ones `benchmarks/train_step.py` measured (README, Benchmarks): a dry run multiplies
them out; it is an estimate and says what it assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import TrainConfig

#: images per second per device, measured: (device, arch, method) -> img/s
MEASURED_IMG_PER_S: dict[tuple[str, str, str], float] = {
    ("gpu", "vit_small", "dino"): 1045.0,  # H200, bf16, eager, batch 64
    ("gpu", "vit_small", "selfpatch"): 604.0,
    ("cpu", "vit_tiny", "dino"): 108.0,  # 2 CPU cores, the tiny preset
    ("cpu", "vit_tiny", "selfpatch"): 63.0,
    ("cpu", "vit_small", "dino"): 1.3,  # 2 CPU cores, 224 px, batch 8
    ("cpu", "vit_small", "selfpatch"): 0.9,
}
#: images of the datasets the presets name, when the config does not cap them
DATASET_IMAGES = {"fashion_mnist": 60_000, "imagefolder": 1_281_167}  # imagefolder: assumed ImageNet-1k train


@dataclass(frozen=True)
class Estimate:
    hours: float  # wall time of one trial
    accelerator_hours: float  # wall time x accelerators (0 for CPU trials)
    assumption: str


def estimate(cfg: TrainConfig, accelerators: int) -> Estimate:
    device = "gpu" if accelerators > 0 else "cpu"
    images = cfg.data.max_samples or DATASET_IMAGES[cfg.data.dataset]
    key = (device, cfg.model.arch, cfg.method)
    rate = MEASURED_IMG_PER_S.get(key) or MEASURED_IMG_PER_S.get((device, "vit_small", cfg.method), 1.0)
    devices = max(accelerators, 1)
    hours = images * cfg.optim.epochs / (rate * devices) / 3600
    source = "measured" if key in MEASURED_IMG_PER_S else "ViT-S rate (no measurement for this arch)"
    what = f"{images:,} images x {cfg.optim.epochs} epochs at {rate:g} img/s per {device} ({source})"
    return Estimate(hours, hours * accelerators, what)
