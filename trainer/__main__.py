"""`python -m trainer --config PRESET [key=value ...]`: train or resume one run."""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.presets import ConfigError, dump_yaml, load_config, preset_names

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 75


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="DINO / DINO+SelfPatch pretraining of timm ViTs. Resumes automatically from "
        "<checkpoint.output_dir>/checkpoint.pth; SIGTERM or SIGUSR1 checkpoint and exit with code 75.",
        epilog="examples:\n"
        "  python -m trainer --config tiny_cpu\n"
        "  python -m trainer --config selfpatch_vits16 data.path=/datasets/imagenet/train selfpatch.k=4\n"
        "  torchrun --nproc_per_node 8 -m trainer --config dino_vits16 checkpoint.output_dir=runs/dino\n"
        f"presets: {', '.join(preset_names())}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", default=None, help="preset name from configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.epochs=10 selfpatch.k=4")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and its hash, train nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        print(f"# config_hash: {cfg.config_hash()}")
        return EXIT_OK

    from trainer.checkpoint import CheckpointError
    from trainer.data.datasets import DatasetError
    from trainer.engine import NonFiniteLossError
    from trainer.train import train

    try:
        result = train(cfg)
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG if isinstance(exc, ConfigError | DatasetError) else EXIT_FAILED
    if result.status == "collapsed":
        print(f"error: {result.reason}; stopped (collapse.stop=true), checkpoint {result.checkpoint}", file=sys.stderr)
        return EXIT_FAILED
    if result.status == "interrupted":
        print(
            f"interrupted at iteration {result.iteration} ({result.reason}); rerun the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(f"done: {result.iteration} iterations, checkpoint {result.checkpoint}, export manifest {result.manifest}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
