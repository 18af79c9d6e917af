"""Exports of the teacher backbone that other tools load strictly (spec D4 of conventions).

From one training checkpoint: a plain timm state dict (torch and safetensors), an mmdet/mmseg file
(`{'state_dict': {'backbone.*'}}`), a DINO-eval file (`{'teacher': {'backbone.*'}}`) and a JSON manifest
with the sha256 of every file. Every state dict is loaded with strict=True into the timm model the
manifest names before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import CheckpointError, load_checkpoint, require_training_checkpoint, strip_prefixes
from trainer.config import TrainConfig
from trainer.files import atomic_write, sha256_file
from trainer.models.vit import TIMM_NAMES, timm_kwargs
from trainer.presets import ConfigError, validate_config

MANIFEST = "manifest.json"
FORMATS = ("torch", "safetensors", "mm", "dino", "aggregation")
FILE_NAMES = {
    "torch": "backbone.pth",
    "safetensors": "backbone.safetensors",
    "mm": "backbone_mm.pth",
    "dino": "teacher_backbone.pth",
    "aggregation": "aggregation.safetensors",  # SelfPatch only: the teacher's ca_head (image token)
}


def config_of(state: dict[str, Any], path: Path) -> TrainConfig:
    try:
        return validate_config(state["config"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: the config stored in the checkpoint is not valid here: {exc}") from exc


def backbone_state_dict(state: dict[str, Any], key: str = "teacher") -> dict[str, torch.Tensor]:
    """The `backbone.*` weights of the teacher (or student), with prefixes removed."""
    weights = strip_prefixes(state[key])
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    if not backbone:
        raise CheckpointError(f"no 'backbone.*' weights under {key!r}")
    return backbone


def aggregation_state_dict(state: dict[str, Any], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The teacher's SelfPatch aggregation module, verified by a strict load (its image token is a feature)."""
    from trainer.models.selfpatch import AggregationHead

    weights = strip_prefixes(state["teacher"])
    module = {
        k.removeprefix("ca_head."): v.float().contiguous() for k, v in weights.items() if k.startswith("ca_head.")
    }
    width, _, heads = cfg.model.dims
    sp = cfg.selfpatch
    head = AggregationHead(width, heads, k=sp.k, window=sp.window, border=sp.border, num_blocks=sp.num_blocks)
    result = head.load_state_dict(module, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"aggregation module does not load strictly: missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}"
        )
    return module


def timm_backbone(cfg: TrainConfig) -> torch.nn.Module:
    """The plain timm model an export loads into (no class token and no final norm for SelfPatch)."""
    import timm

    return timm.create_model(
        TIMM_NAMES[cfg.model.arch], pretrained=False, **timm_kwargs(cfg.model, cfg.method, cfg.img_size)
    )


def verify_strict(weights: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.nn.Module:
    model = timm_backbone(cfg)
    result = model.load_state_dict(weights, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:6])}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:6])}")
    if problems:
        raise CheckpointError("backbone does not load strictly into timm: " + "; ".join(problems))
    return model


def _write_torch(obj: Any) -> Any:
    return lambda tmp: torch.save(obj, tmp)


def _write_safetensors(weights: dict[str, torch.Tensor]) -> Any:
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in weights.items()}
    return lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"})


def export_checkpoint(checkpoint: Path, out_dir: Path, formats: tuple[str, ...] = FORMATS) -> dict[str, Any]:
    """Write the exports of `checkpoint` into `out_dir` and return the manifest."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
    state = load_checkpoint(checkpoint)
    require_training_checkpoint(state, checkpoint)
    cfg = config_of(state, checkpoint)
    weights = {k: v.float().contiguous() for k, v in backbone_state_dict(state).items()}
    verify_strict(weights, cfg)

    if cfg.method != "selfpatch":
        formats = tuple(f for f in formats if f != "aggregation")
    aggregation = aggregation_state_dict(state, cfg) if "aggregation" in formats else {}
    prefixed = {f"backbone.{k}": v for k, v in weights.items()}
    writers = {
        "torch": _write_torch(weights),
        "safetensors": _write_safetensors(weights),
        "mm": _write_torch({"state_dict": prefixed, "meta": {"source": str(checkpoint)}}),
        "dino": _write_torch({"teacher": prefixed}),
        "aggregation": _write_safetensors(aggregation),
    }
    loaders = {
        "torch": "model.load_state_dict(torch.load(f, weights_only=True), strict=True)",
        "safetensors": "model.load_state_dict(safetensors.torch.load_file(f), strict=True)",
        "mm": "init_cfg=dict(type='Pretrained', checkpoint=f, prefix='backbone.')",
        "dino": "utils.load_pretrained_weights(model, f, 'teacher', ...)  # DINO eval scripts",
        "aggregation": "trainer.models.selfpatch.AggregationHead(...).load_state_dict(load_file(f), strict=True)",
    }
    files: dict[str, Any] = {}
    for fmt in formats:
        path = out_dir / FILE_NAMES[fmt]
        atomic_write(path, writers[fmt])
        files[fmt] = {
            "path": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "load": loaders[fmt],
        }

    has_cls = cfg.method == "dino"
    manifest = {
        "format_version": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": cfg.method,
        "arch": cfg.model.arch,
        "patch_size": cfg.model.patch_size,
        "timm": {"model_name": TIMM_NAMES[cfg.model.arch], "kwargs": timm_kwargs(cfg.model, cfg.method, cfg.img_size)},
        "has_class_token": has_cls,
        "has_final_norm": has_cls,
        "features": "normed [CLS] token"
        if has_cls
        else "raw last-block patch tokens: no [CLS] token and no final norm (SelfPatch backbone)",
        "source_checkpoint": {
            "path": str(checkpoint.resolve()),
            "sha256": sha256_file(checkpoint),
            "epoch": int(state["epoch"]),
            "iteration": int(state["iteration"]),
        },
        "config_hash": cfg.config_hash(),
        "git_commit": state.get("git_commit"),
        "training_metrics": state.get("metrics", {}),
        "files": files,
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write(out_dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Export the teacher backbone of a training checkpoint (timm torch/safetensors, mmdet/mmseg, "
        "DINO-eval) with a sha256 manifest; every file is verified by a strict timm load.",
    )
    parser.add_argument("checkpoint", type=Path, help="training checkpoint (checkpoint.pth or checkpointNNNN.pth)")
    parser.add_argument("out_dir", type=Path, help="folder for the exported files and manifest.json")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    args = parser.parse_args(argv)
    try:
        manifest = export_checkpoint(args.checkpoint, args.out_dir, tuple(f for f in args.formats.split(",") if f))
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for fmt, entry in manifest["files"].items():
        print(f"{fmt:12s} {args.out_dir / entry['path']}  sha256={entry['sha256'][:16]}")
    print(f"manifest     {args.out_dir / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
