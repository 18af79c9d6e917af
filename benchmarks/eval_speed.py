"""Wall time of every benchmark's tiny config, and the speed-up of the feature cache, measured in one run.

The k-NN and linear probes run twice on the same checkpoint: cold (empty feature cache) and warm (features
from the cache); the ratio is the cache's speed-up. The linear probe also runs as DINO published it (SGD on
augmented crops, the backbone run in every epoch), against the whole L-BFGS run on cached features. The two
linear protocols (DINO's SGD, 100 epochs, and L-BFGS logistic regression with its L2 chosen on held-out
training features) are then fitted on the same cached features, of the checkpoint and of raw pixels: probe
time, top-1 and the SGD / L-BFGS time ratio.
Detection and segmentation run their tiny configs on freshly generated synthetic composites. Every number
comes from this process, so ratios are fair.

    python benchmarks/eval_speed.py                                   # micro checkpoint trained here
    python benchmarks/eval_speed.py --checkpoint outputs/tiny_cpu/checkpoint.pth
    python benchmarks/eval_speed.py --quick                           # smaller subsets and schedules
    python benchmarks/eval_speed.py --linear-only --threads 1         # the two linear protocols only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def micro_checkpoint(out: Path, data: Path) -> Path:
    """A real trainer checkpoint in seconds: 1 epoch of a 2-block, 32-wide SelfPatch ViT on 64 images."""
    from trainer.presets import load_config
    from trainer.train import train

    overrides = [
        "model.embed_dim=32", "model.num_heads=2", "model.depth=2", "head.hidden_dim=64", "head.bottleneck_dim=32",
        "head.out_dim=128", "selfpatch.out_dim=64", "crops.local_number=2", "optim.batch_size_per_gpu=8",
        "optim.epochs=1", "optim.warmup_epochs=0", "data.max_samples=64", "data.num_workers=0", f"data.path={data}",
        f"checkpoint.output_dir={out}", "logging.mlflow=false", "logging.progress='off'", "logging.log_every=100",
    ]  # fmt: skip
    train(load_config("tiny_cpu", overrides))
    return out / "checkpoint.pth"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate (default: train a micro one here)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "fashion-mnist", help="Fashion-MNIST folder")
    parser.add_argument("--sources", type=Path, default=REPO / "data" / "composite-sources", help="composite sources")
    parser.add_argument("--quick", action="store_true", help="2k/1k probe subsets, 20 dense iterations")
    parser.add_argument("--linear-only", action="store_true", help="only the linear probe rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from evaluator.benchmarks import BENCHMARKS
    from evaluator.composites import generate

    work = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    checkpoint = args.checkpoint or micro_checkpoint(work / "ckpt", args.data)
    probe = ["max_train_samples=2000", "max_test_samples=1000"] if args.quick else []
    dense_its = 20 if args.quick else None
    rows: list[tuple[str, str, float, str]] = []

    def timed(name: str, data: Path, overrides: list[str], cache: Path | None) -> tuple[float, dict[str, float]]:
        start = time.perf_counter()
        metrics = BENCHMARKS[name].evaluate(checkpoint, data, "tiny", overrides=overrides, cache_dir=cache)
        return time.perf_counter() - start, metrics

    cache = work / "cache"
    if not args.linear_only:
        cold_knn, knn = timed("knn", args.data, probe, cache)
        warm_knn, _ = timed("knn", args.data, probe, cache)
        rows.append(("knn", "tiny, cold cache", cold_knn, f"top1_k20 {knn['knn/top1_k20']:.2f}"))
        rows.append(("knn", "tiny, warm cache", warm_knn, f"cache speed-up x{cold_knn / warm_knn:.1f}"))
    cold_lin, linear = timed("linear", args.data, probe, work / "cache-linear")
    warm_lin, _ = timed("linear", args.data, probe, work / "cache-linear")
    rows.append(("linear", "tiny, cold cache", cold_lin, f"top1 {linear['linear/top1']:.2f}"))
    rows.append(("linear", "tiny, warm cache", warm_lin, f"cache speed-up x{cold_lin / warm_lin:.1f}"))
    lbfgs_s, lbfgs = timed("linear", args.data, [*probe, "protocol=lbfgs"], work / "cache-linear")
    rows.append(
        (
            "linear",
            "tiny+lbfgs, warm cache",
            lbfgs_s,
            f"top1 {lbfgs['linear/top1']:.2f}, whole run x{warm_lin / lbfgs_s:.1f}",
        )
    )
    # DINO's protocol as published: every epoch runs the frozen backbone on freshly augmented crops, so no cache
    # can serve it; this is the SGD protocol the L-BFGS one replaces when features are cached
    augmented_s, augmented = timed("linear", args.data, [*probe, "train_augment=true"], work / "cache-linear")
    rows.append(
        (
            "linear",
            "tiny+augment (DINO)",
            augmented_s,
            f"top1 {augmented['linear/top1']:.2f} (top1_best {augmented['linear/top1_best']:.2f}), "
            f"lbfgs run x{augmented_s / lbfgs_s:.1f} faster",
        )
    )
    rows += protocol_rows(checkpoint, args.data, probe, work / "cache-linear")
    if args.linear_only:
        print_rows(rows, checkpoint)
        return 0

    start = time.perf_counter()
    counts = {"train": 40, "val": 10} if args.quick else {"train": 200, "val": 50}
    composites = work / "composites"
    generate(args.sources, composites, counts, size=256, seed=0)
    gen_s = time.perf_counter() - start
    rows.append(
        ("composites", f"{counts['train']}+{counts['val']} images", gen_s, f"{sum(counts.values()) / gen_s:.0f} img/s")
    )

    det_over = [f"max_iterations={dense_its}"] if dense_its else []
    det_s, det = timed("det", composites, det_over, None)
    rows.append(("det", "tiny", det_s, f"bbox_AP {det['det/bbox_AP']:.2f}, {det['det/train_iterations']:.0f} it"))
    seg_over = [f"iterations={dense_its}"] if dense_its else []
    seg_s, seg = timed("seg", composites, seg_over, None)
    rows.append(("seg", "tiny", seg_s, f"mIoU {seg['seg/mIoU']:.2f}, {seg['seg/train_iterations']:.0f} it"))

    print_rows(rows, checkpoint)
    return 0


def protocol_rows(checkpoint: Path, data: Path, probe: list[str], cache: Path) -> list[tuple[str, str, float, str]]:
    """SGD (tiny: 100 epochs) vs L-BFGS probe time and top-1 on the same cached features (probe fit only)."""
    from evaluator.benchmarks import BENCHMARKS
    from evaluator.config import LinearConfig
    from evaluator.features import FeatureCache, probe_features
    from evaluator.linear import lbfgs_probe, linear_spec, sgd_probe

    bench = BENCHMARKS["linear"]
    sgd_cfg = bench.config("tiny", probe)
    lbfgs_cfg = bench.config("tiny", [*probe, "protocol=lbfgs"])
    assert isinstance(sgd_cfg, LinearConfig) and isinstance(lbfgs_cfg, LinearConfig)
    rows: list[tuple[str, str, float, str]] = []
    for label, subject in (("ckpt", bench.subject(checkpoint)), ("pixels", bench.subject(None, "pixels"))):
        spec = linear_spec(subject, sgd_cfg)
        extractor, split, train, test = probe_features(subject, data, sgd_cfg, FeatureCache(cache), spec=spec)
        start = time.perf_counter()
        sgd = sgd_probe(extractor, split.dataset, train, test, split.num_classes, sgd_cfg)
        sgd_s = time.perf_counter() - start
        start = time.perf_counter()
        lb = lbfgs_probe(train, test, split.num_classes, lbfgs_cfg.lbfgs, seed=lbfgs_cfg.seed)
        lb_s = time.perf_counter() - start
        where = f"{label} D={train.features.shape[1]}"
        rows.append(("probe sgd", where, sgd_s, f"top1 {sgd['top1']:.2f} (top1_best {sgd['top1_best']:.2f})"))
        rows.append(
            (
                "probe lbfgs",
                where,
                lb_s,
                f"top1 {lb['top1']:.2f}, l2 {lb['l2']:g}, {lb['iterations']:.0f} it, sgd/lbfgs x{sgd_s / lb_s:.2f}",
            )
        )
    return rows


def print_rows(rows: list[tuple[str, str, float, str]], checkpoint: Path) -> None:
    import torch

    print(f"\ncheckpoint {checkpoint}  torch threads {torch.get_num_threads()}  device cpu")
    print(f"{'benchmark':<11} {'config':<22} {'wall s':>8}  notes")
    for name, config, seconds, notes in rows:
        print(f"{name:<11} {config:<22} {seconds:>8.1f}  {notes}")


if __name__ == "__main__":
    sys.exit(main())
