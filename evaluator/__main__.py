"""`python -m evaluator BENCHMARK --checkpoint CKPT --data DATA [--config tiny|full] [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    from evaluator.config import BENCHMARKS

    parser = argparse.ArgumentParser(
        prog="python -m evaluator",
        description="Evaluate a DINO / SelfPatch checkpoint on one benchmark and print its metrics (percent). "
        "CKPT is a training checkpoint (checkpoint.pth), an export folder / manifest.json, an official DINO / "
        "SelfPatch checkpoint, or a timm / mm / DINO-eval state dict (the model is inferred from its tensors). "
        "Every benchmark has a 'tiny' config (2 CPU cores, minutes) and a 'full' config (the papers' protocol). "
        "k-NN and linear features are cached by checkpoint sha256 + dataset + transform, so a second probe computes "
        "no features.",
        epilog="examples:\n"
        "  python -m evaluator knn --checkpoint outputs/tiny_cpu/checkpoint.pth --data data/fashion-mnist\n"
        "  python -m evaluator linear --checkpoint outputs/tiny_cpu/export --data data/fashion-mnist feature.pool=avg\n"
        "  python -m evaluator knn --checkpoint outputs/tiny_cpu/checkpoint.pth --data data/fashion-mnist "
        "--baseline random\n"
        "  python -m evaluator det --checkpoint run/checkpoint.pth --data data/composites --output json\n"
        "  python -m evaluator seg --checkpoint run/checkpoint.pth --data /data/ADEChallengeData2016 --config full\n"
        "  python -m evaluator list\n"
        "exit codes: 0 done, 1 the evaluation failed, 2 bad input (checkpoint, data, config)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*BENCHMARKS, "list"]) + "}")
    sub.add_parser("list", help="benchmarks, their versions and config hashes")
    for name, bench in BENCHMARKS.items():
        p = sub.add_parser(name, help=bench.description, description=f"{name} v{bench.version}: {bench.description}")
        p.add_argument("--checkpoint", "-k", type=Path, help="checkpoint, export folder, manifest.json or weights file")
        p.add_argument(
            "--num-heads", type=int, default=None, help="attention heads of a foreign checkpoint of an unknown width"
        )
        p.add_argument("--data", "-d", type=Path, required=True, help=bench.data)
        p.add_argument(
            "--config", "-c", default="tiny", help="'tiny' (default), 'full', or a YAML/JSON file with config fields"
        )
        p.add_argument(
            "overrides", nargs="*", help="dotted config overrides, e.g. feature.pool=avg max_test_samples=1000"
        )
        choices = ["random", "pixels"] if bench.accepts_pixels else ["random"]
        p.add_argument(
            "--baseline",
            choices=choices,
            help="evaluate a floor instead: 'random' = randomly initialised ViT of the checkpoint's shape"
            + (", 'pixels' = raw pixels" if bench.accepts_pixels else ""),
        )
        if bench.feature_cache:
            p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default outputs/feature_cache)")
            p.add_argument(
                "--no-cache", action="store_true", help="compute features without reading or writing the cache"
            )
        p.add_argument("--output", choices=["text", "json"], default="text", help="'json': the full result record")
        p.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="progress bars on stderr")
        p.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    return parser


def _load_config_arg(value: str) -> Any:
    path = Path(value)
    if path.suffix in {".yaml", ".yml", ".json"}:
        import yaml

        from trainer.presets import ConfigError, parse_yaml

        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = parse_yaml(path.read_text())  # the same YAML reading as overrides and run configs
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML/JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        return data
    return value


def _print_text(result: Any) -> None:
    print(f"{result.benchmark} v{result.version}  config={result.config_name} ({result.config_hash[:12]})")
    subject = f"baseline={result.baseline}" if result.baseline else f"checkpoint={result.checkpoint}"
    print(f"{subject}  sha256={result.checkpoint_sha256[:16]}  data={result.dataset}  {result.seconds:.1f}s")
    width = max(len(k) for k in result.metrics)
    for key, value in result.metrics.items():
        print(f"  {key:<{width}}  {value:.2f}")


def one_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an error message (torch's load errors run over many lines), shortened."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return first if len(first) <= limit else first[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from evaluator.benchmarks import DEFAULT_CACHE_DIR, describe, get_benchmark
    from evaluator.composites import SourcesError
    from trainer.checkpoint import CheckpointError
    from trainer.data.datasets import DatasetError
    from trainer.presets import ConfigError

    if args.command == "list":
        entries = describe()
        width = max(len(entry["name"]) for entry in entries)
        for entry in entries:
            configs = ", ".join(f"{k}={v[:12]}" for k, v in entry["configs"].items())
            print(f"{entry['name']:<{width}} v{entry['version']}  {entry['description']}  [{configs}]")
        return EXIT_OK
    bench = get_benchmark(args.command)
    progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    try:
        config = _load_config_arg(args.config)
        cfg = bench.config(config, args.overrides)
        if args.dump_config:
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
            return EXIT_OK
        if args.checkpoint is None and args.baseline != "pixels":
            raise ConfigError("--checkpoint is required (except with --baseline pixels)")
        cache_dir = None
        if hasattr(args, "cache_dir") and not args.no_cache:
            cache_dir = args.cache_dir or DEFAULT_CACHE_DIR
        result = bench.run(
            args.checkpoint,
            args.data,
            config,
            overrides=args.overrides,
            baseline=args.baseline,
            cache_dir=cache_dir,
            progress=progress,
            num_heads=args.num_heads,
        )
    except (ConfigError, DatasetError, CheckpointError, SourcesError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, FloatingPointError, RuntimeError) as exc:
        print(f"error: {args.command} failed: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    if args.output == "json":
        print(result.model_dump_json(indent=2))
    else:
        _print_text(result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
