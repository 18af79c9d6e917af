"""Exports of the teacher backbone that other tools load strictly (spec D4 of conventions).

From one checkpoint (ours, or any layout `trainer.weights` reads): a plain timm state dict (torch and
safetensors), an mmdet/mmseg file (`{'state_dict': {'backbone.*'}}`), a DINO-eval file
(`{'teacher': {'backbone.*'}}`), for SelfPatch the aggregation module, and a JSON manifest with the sha256 of
every file and how to load it. The weights are read by `trainer.weights.read_weights` (the one reader) and
loaded with strict=True into the timm model the manifest names before anything is written.

At other input sizes: the manifest's timm kwargs set `dynamic_img_size=True`, so timm accepts any multiple of
the patch size, but timm resamples the positional embedding its own way; the manifest's `pos_embed_interp`
says how training resized it, and `trainer.weights.load_exported_backbone(folder)` rebuilds our module, whose
features equal the trainer's at every size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import CheckpointError
from trainer.config import ARCHS, TrainConfig
from trainer.files import EXPORT_FILES, MANIFEST, atomic_write, atomic_write_text, sha256_file
from trainer.models.vit import timm_kwargs
from trainer.weights import check_state_dict, read_weights

FORMATS = tuple(EXPORT_FILES)
LOADERS = {
    "torch": "model.load_state_dict(torch.load(f, weights_only=True), strict=True)",
    "safetensors": "model.load_state_dict(safetensors.torch.load_file(f), strict=True)",
    "mm": "init_cfg=dict(type='Pretrained', checkpoint=f, prefix='backbone.')",
    "dino": "utils.load_pretrained_weights(model, f, 'teacher', ...)  # DINO eval scripts",
    "aggregation": "trainer.weights.read_weights(<folder>).aggregation_head()  # AggregationHead, strict load",
}


def timm_spec(cfg: TrainConfig) -> dict[str, Any]:
    """The `timm.create_model` call an export loads into: any input size (timm's own position resize)."""
    kwargs = {**timm_kwargs(cfg.model, cfg.method, cfg.img_size), "dynamic_img_size": True}
    return {"model_name": ARCHS[cfg.model.arch].timm_name, "kwargs": kwargs}


def verify_strict(weights: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.nn.Module:
    """The plain timm model the manifest names, loaded strictly (no class token and no final norm for SelfPatch)."""
    import timm

    spec = timm_spec(cfg)
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    check_state_dict(
        model.state_dict(),
        weights,
        "backbone",
        f"timm.create_model({spec['model_name']!r})",
        "the timm model the manifest names",
    )
    model.load_state_dict(weights, strict=True)
    return model


def _write_torch(obj: Any) -> Any:
    return lambda tmp: torch.save(obj, tmp)


def _write_safetensors(weights: dict[str, torch.Tensor]) -> Any:
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in weights.items()}
    return lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"})


def export_checkpoint(
    checkpoint: Path, out_dir: Path, formats: tuple[str, ...] = FORMATS, *, num_heads: int | None = None
) -> dict[str, Any]:
    """Write the exports of `checkpoint` into `out_dir` and return the manifest.

    `num_heads` is for files without a config of ours whose width names no known ViT (see trainer.weights).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
    record = read_weights(checkpoint, num_heads=num_heads)
    cfg, weights = record.config, record.backbone
    verify_strict(weights, cfg)
    if record.aggregation is None:
        formats = tuple(f for f in formats if f != "aggregation")
    prefixed = {f"backbone.{k}": v for k, v in weights.items()}
    writers = {
        "torch": _write_torch(weights),
        "safetensors": _write_safetensors(weights),
        "mm": _write_torch({"state_dict": prefixed, "meta": {"source": str(checkpoint)}}),
        "dino": _write_torch({"teacher": prefixed}),
        "aggregation": _write_safetensors(record.aggregation or {}),
    }
    files: dict[str, Any] = {}
    for fmt in formats:
        path = out_dir / EXPORT_FILES[fmt]
        atomic_write(path, writers[fmt])
        files[fmt] = {
            "path": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "load": LOADERS[fmt],
        }

    has_cls = cfg.method == "dino"
    manifest = {
        "format_version": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": cfg.method,
        "arch": cfg.model.arch,
        "patch_size": cfg.model.patch_size,
        "img_size": cfg.img_size,
        "timm": timm_spec(cfg),
        "has_class_token": has_cls,
        "has_final_norm": has_cls,
        "features": "normed [CLS] token"
        if has_cls
        else "raw last-block patch tokens: no [CLS] token and no final norm (SelfPatch backbone)",
        "pos_embed_interp": cfg.model.pos_embed_interp,
        "other_input_sizes": (
            f"any multiple of {cfg.model.patch_size} px; the trainer's exact features (positional embedding resized "
            f"the '{cfg.model.pos_embed_interp}' way): trainer.weights.load_exported_backbone(<this folder>); "
            "timm with dynamic_img_size=True resamples it its own way (equal only at img_size)"
        ),
        "source_checkpoint": {
            "path": str(checkpoint.resolve()),
            "sha256": record.sha256,
            "layout": record.layout,
            "epoch": record.meta.get("epoch"),
            "iteration": record.meta.get("iteration"),
        },
        "config_hash": cfg.config_hash(),
        "git_commit": record.meta.get("git_commit"),
        "training_metrics": record.meta.get("metrics", {}),
        "files": files,
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Export the teacher backbone of a checkpoint (ours, official DINO / SelfPatch, DINO-eval, timm, "
        "mm) as timm torch/safetensors, mmdet/mmseg and DINO-eval files with a sha256 manifest; every file is "
        "verified by a strict timm load.",
    )
    parser.add_argument(
        "checkpoint", type=Path, help="training checkpoint (checkpoint.pth, checkpointNNNN.pth) or weights"
    )
    parser.add_argument("out_dir", type=Path, help="folder for the exported files and manifest.json")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    parser.add_argument("--num-heads", type=int, help="attention heads, for foreign weights of an unknown width")
    args = parser.parse_args(argv)
    formats = tuple(f for f in args.formats.split(",") if f)
    try:
        manifest = export_checkpoint(args.checkpoint, args.out_dir, formats, num_heads=args.num_heads)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for fmt, entry in manifest["files"].items():
        print(f"{fmt:12s} {args.out_dir / entry['path']}  sha256={entry['sha256'][:16]}")
    print(f"manifest     {args.out_dir / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
