"""How the tiny preset was chosen: short pretraining candidates scored by 20-NN on Fashion-MNIST.

Each candidate is `tiny_cpu` plus overrides, trained for the same number of steps; its teacher and
student are scored against a randomly initialised model of the same shape and against raw pixels,
all in the same run. Runs on CPU or, much faster, on a GPU (the recipe transfers; the clock does not).

    python benchmarks/tiny_preset_sweep.py --device cuda --only base,fast_teacher
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.data.datasets import FashionMNIST  # noqa: E402
from trainer.models.wrapper import build_model  # noqa: E402
from trainer.presets import load_config  # noqa: E402
from trainer.train import train  # noqa: E402

SMALL = ["model.embed_dim=128", "model.num_heads=4", "head.hidden_dim=256", "head.bottleneck_dim=128"]
EASY_CROPS = ["crops.global_scale=[0.4,1.0]", "crops.local_scale=[0.2,0.5]", "crops.blur_radius=[0.1,0.5]"]
CANDIDATES: dict[str, list[str]] = {
    "preset": [],
    "base": [*SMALL, "crops.local_number=2", "head.out_dim=1024", "selfpatch.out_dim=512"],
    "fast_teacher": [
        *SMALL,
        "crops.local_number=2",
        "head.out_dim=1024",
        "selfpatch.out_dim=512",
        "optim.momentum_teacher=0.9",
    ],
    "teacher_0.97": [
        *SMALL,
        "crops.local_number=2",
        "head.out_dim=1024",
        "selfpatch.out_dim=512",
        "optim.momentum_teacher=0.97",
    ],
    "low_lr": [*SMALL, "crops.local_number=2", "head.out_dim=1024", "selfpatch.out_dim=512", "optim.lr=0.0005"],
    "easy_crops": [*SMALL, "crops.local_number=2", "head.out_dim=1024", "selfpatch.out_dim=512", *EASY_CROPS],
    "easy_crops_0.97": [
        *SMALL,
        "crops.local_number=2",
        "head.out_dim=1024",
        "selfpatch.out_dim=512",
        *EASY_CROPS,
        "optim.momentum_teacher=0.97",
    ],
    "easy_crops_0.97_dino": [
        *SMALL,
        "crops.local_number=2",
        "head.out_dim=1024",
        *EASY_CROPS,
        "optim.momentum_teacher=0.97",
        "method=dino",
    ],
    "base_dino": [*SMALL, "crops.local_number=2", "head.out_dim=1024", "method=dino"],
    "out4096": [*SMALL, "crops.local_number=2", "head.out_dim=4096", "selfpatch.out_dim=1024"],
    "no_freeze": [
        *SMALL,
        "crops.local_number=2",
        "head.out_dim=1024",
        "selfpatch.out_dim=512",
        "optim.freeze_last_layer=0",
        "optim.momentum_teacher=0.97",
    ],
    "local4_0.97": [
        *SMALL,
        "crops.local_number=4",
        "head.out_dim=1024",
        "selfpatch.out_dim=512",
        "optim.momentum_teacher=0.97",
    ],
    "wide_0.97": [
        "crops.local_number=2",
        "head.out_dim=1024",
        "selfpatch.out_dim=512",
        "head.hidden_dim=256",
        "optim.momentum_teacher=0.97",
    ],
}


def fmnist_tensors(split: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = FashionMNIST(REPO / "data" / "fashion-mnist", split)
    images = torch.from_numpy(data.images[:count].copy()).float().div(255.0)
    images = F.interpolate(images[:, None], size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images.repeat(1, 3, 1, 1) - mean) / std, torch.from_numpy(data.targets[:count])


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """DINO's weighted 20-NN: cosine similarity, votes exp(sim / 0.07)."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    correct = 0
    for start in range(0, len(test_x), 1000):
        sim, idx = (test_x[start : start + 1000] @ train_x.t()).topk(20, dim=1)
        votes = torch.zeros(len(sim), 10, device=sim.device).scatter_add_(1, train_y[idx], (sim / 0.07).exp())
        correct += int((votes.argmax(1) == test_y[start : start + 1000]).sum())
    return 100.0 * correct / len(test_x)


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    model.eval().to(device)
    out: dict[str, list[torch.Tensor]] = {"pooled": [], "image": []}
    for start in range(0, len(images), 1000):
        x = images[start : start + 1000].to(device)
        tokens = model.backbone.features(x)
        if tokens.ndim == 2:  # DINO: normed [CLS]
            out["image"].append(tokens)
        else:
            grid = (x.shape[-2] // 4, x.shape[-1] // 4)
            image, _ = model.ca_head(tokens, grid, match=False)
            out["pooled"].append(tokens.mean(1))
            out["image"].append(image)
    return {k: torch.cat(v) for k, v in out.items() if v}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps per candidate (batch 64)")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    names = args.only.split(",") if args.only else list(CANDIDATES)
    train_x, train_y = fmnist_tensors("train", args.train_images, 32)
    test_x, test_y = fmnist_tensors("test", args.test_images, 32)
    train_y, test_y = train_y.to(device), test_y.to(device)
    rows = [
        {
            "candidate": "raw pixels",
            "teacher": knn_top1(train_x.flatten(1).to(device), train_y, test_x.flatten(1).to(device), test_y),
        }
    ]
    print(json.dumps(rows[0]), flush=True)
    epochs = 3
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [
                *CANDIDATES[name],
                f"device={device.type}",
                "precision=fp32",
                "logging.mlflow=false",
                "logging.progress=off",
                f"checkpoint.output_dir={tmp}",
                "checkpoint.saveckp_freq=0",
                f"data.path={REPO / 'data' / 'fashion-mnist'}",
                f"data.num_workers={args.workers}",
                "optim.batch_size_per_gpu=64",
                f"optim.epochs={epochs}",
                "optim.warmup_epochs=1",
                f"data.max_samples={args.steps * 64 // epochs}",
            ]
            cfg = load_config("tiny_cpu", overrides)
            start = time.time()
            result = train(cfg)
            seconds = time.time() - start
            state = torch.load(Path(tmp) / "checkpoint.pth", map_location="cpu", weights_only=True)
            row: dict[str, object] = {
                "candidate": name,
                "steps": result.iteration,
                "train_s": round(seconds, 1),
                "loss": result.metrics.get("train/loss"),
            }
            for which in ("teacher", "student", "random"):
                torch.manual_seed(0)
                model = build_model(cfg, student=False)
                if which != "random":
                    model.load_state_dict(state[which])
                feats_train = features(model, train_x, device)
                feats_test = features(model, test_x, device)
                for kind in feats_train:
                    row[f"{which}/{kind}"] = round(knn_top1(feats_train[kind], train_y, feats_test[kind], test_y), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
