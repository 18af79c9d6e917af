"""The one reader of weights files: any supported layout becomes one canonical, strictly checked record.

Like timm's `checkpoint_filter_fn`, every foreign layout is adapted here and nowhere else: the exporter
(`trainer.export`, the writer) and the evaluator both read through `read_weights`. A record holds the run
config that rebuilds the model, the backbone state dict in our timm layout (the keys of `MultiCropViT`), the
SelfPatch aggregation module's state dict (the official `ca_head`) or None, the identity of the file and the
layout it was found in (`LAYOUTS`).

Every record is checked against the model its config describes before it is returned: a missing,
unexpected or mis-shaped tensor is a `CheckpointError` naming it, and NaN or inf weights are refused; loads
are never partial. Files without a config of ours (official DINO / SelfPatch checkpoints, timm, mm, DINO-eval
files) get one inferred from their tensors: width, depth and patch size from the shapes, the training image
size from the positional embedding, a [CLS] token means the DINO backbone, none the SelfPatch one; the
number of heads comes from the `ARCHS` entry of that width, or must be given.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import CheckpointError, load_checkpoint, strip_prefixes
from trainer.config import ARCHS, TrainConfig, arch_for_width
from trainer.files import EXPORT_FILES, MANIFEST, sha256_file
from trainer.models.selfpatch import AggregationHead
from trainer.models.vit import MultiCropViT, build_backbone
from trainer.presets import ConfigError, validate_config

#: The layouts the reader recognises (a record's `layout`).
LAYOUTS: dict[str, str] = {
    "trainer": "training checkpoint of this trainer (student/teacher with backbone.*, ca_head.*, heads; config)",
    "export": "export folder of this trainer (manifest.json, backbone.safetensors or .pth, aggregation.safetensors)",
    "official": "official DINO / SelfPatch training checkpoint (student with module.*, teacher, args, dino_loss)",
    "teacher": "{'teacher': {'backbone.*', heads}} as DINO's eval scripts hold it (dinov2 uses the container too)",
    "mm": "{'state_dict': {'backbone.*', ...}} of mmdet / mmseg / Lightning; other namespaces are dropped",
    "timm": "a timm ViT state dict, bare or under state_dict_ema / model_ema / state_dict / model; head.* dropped",
}
#: Projection heads that sit next to the backbone in training layouts: never part of a record.
HEAD_NAMESPACES = frozenset({"head", "c_head", "p_head", "dino_head", "ibot_head"})
#: Where timm's loader looks for a state dict, in its order of preference (EMA weights first).
CONTAINERS = ("state_dict_ema", "model_ema", "state_dict", "model")
#: Export formats that hold the backbone, in the order a reader prefers them (safetensors runs no code).
BACKBONE_FORMATS = ("safetensors", "torch")

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Weights:
    """A backbone (and SelfPatch aggregation module) in our layout, with the config that rebuilds it."""

    config: TrainConfig
    backbone: StateDict
    aggregation: StateDict | None
    identity: str  # sha256 of the weights file, plus ':<key>' / ':heads=<n>' where those change the weights read
    source: str  # the file the weights came from
    layout: str  # a key of LAYOUTS
    sha256: str  # of that file
    meta: dict[str, Any] = field(default_factory=dict)  # epoch, iteration, git_commit, metrics where known

    def vit(self, drop_path_rate: float = 0.0) -> MultiCropViT:
        """Our backbone module with these weights (DINO's positional-embedding resize at every input size)."""
        cfg = self.config
        vit = build_backbone(cfg.model, cfg.method, cfg.img_size, drop_path_rate=drop_path_rate)
        vit.load_state_dict(self.backbone, strict=True)
        return vit

    def aggregation_head(self) -> AggregationHead | None:
        """The SelfPatch aggregation module (its image token is a feature), when the file holds one."""
        if self.aggregation is None:
            return None
        head = AggregationHead.from_config(self.config)
        head.load_state_dict(self.aggregation, strict=True)
        return head


def read_weights(path: Path | str, *, key: str = "teacher", num_heads: int | None = None) -> Weights:
    """The record of any supported file (`LAYOUTS`): a training checkpoint, an export folder, its manifest or
    one of its files, or a foreign checkpoint.

    `key` picks the network of a training checkpoint ('teacher' or 'student'); `num_heads` is needed only
    for a file without a config of ours whose width is none of `ARCHS`.
    """
    path = Path(path)
    manifest = _manifest_of(path)
    if manifest is not None:
        return _checked(_read_export(manifest))
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder without {MANIFEST}: not an export of this trainer")
    return _checked(_read_state(_load_file(path), str(path), sha256_file(path), key, num_heads))


def load_exported_backbone(export: Path | str) -> MultiCropViT:
    """Our backbone rebuilt from an export folder (or its manifest.json) alone, in eval mode.

    It resizes positional embeddings exactly as training did (the manifest's `pos_embed_interp`), so its
    features at any input size that is a multiple of the patch size equal the trainer's own; plain timm with
    `dynamic_img_size=True` resamples differently (see the README). Any other supported file works too.
    """
    return read_weights(export).vit().eval()


def read_manifest(path: Path) -> dict[str, Any]:
    """An export's manifest.json as a dict, or a CheckpointError saying why not."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable export manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} is not an export manifest")
    return manifest


def config_of(data: Any, source: Path | str) -> TrainConfig:
    """The run config stored with weights (a training checkpoint's state, or its 'config' dict), validated."""
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: no training config stored with the weights")
    try:
        return validate_config(data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: the stored config is not valid for this trainer: {exc}") from exc


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    weights: Mapping[str, Any],
    what: str,
    source: str,
    model: str = "the model its config describes",
) -> None:
    """What `load_state_dict(strict=True)` checks, with every problem named in one CheckpointError; NaN refused."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    not_tensors = sorted(k for k in set(expected) & set(weights) if not isinstance(weights[k], torch.Tensor))
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if k not in not_tensors and tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if not_tensors:
        problems.append(f"not tensors {_names(not_tensors)}")
    if shapes:
        problems.append(f"shape mismatch {'; '.join(shapes[:3])}")
    if problems:
        raise CheckpointError(f"{source}: {what} weights do not match {model}: {'; '.join(problems)}")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: {what} weights contain NaN or inf ({', '.join(bad[:3])})")


def infer_config(
    backbone: Mapping[str, torch.Tensor],
    aggregation: Mapping[str, torch.Tensor] | None = None,
    *,
    num_heads: int | None = None,
    args: Mapping[str, Any] | None = None,
    source: str = "weights",
) -> TrainConfig:
    """A valid run config for a backbone known only by its tensors (and, for official files, their `args`)."""
    args = args or {}
    proj = backbone.get("patch_embed.proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.ndim != 4:
        raise CheckpointError(
            f"{source} is not a training checkpoint of this trainer, an export, nor a ViT backbone in a known "
            f"layout: no 'patch_embed.proj.weight' (keys found: {_names(sorted(backbone), 8) or 'none'})"
        )
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    blocks = {int(m.group(1)) for k in backbone if (m := re.match(r"blocks\.(\d+)\.", k))}
    pos = backbone.get("pos_embed")
    if not blocks or not isinstance(pos, torch.Tensor) or pos.ndim != 3:
        raise CheckpointError(f"{source}: a ViT backbone needs 'pos_embed' and 'blocks.N.*' weights")
    has_cls = "cls_token" in backbone
    tokens = int(pos.shape[1]) - int(has_cls)
    side = math.isqrt(tokens)
    if side * side != tokens or proj.shape[-2] != patch:
        raise CheckpointError(f"{source}: only square patches and square position grids are supported")
    arch = arch_for_width(width)
    heads = num_heads or _heads_from_args(args, width) or (ARCHS[arch].heads if arch else None)
    if heads is None:
        raise CheckpointError(
            f"{source}: a {width}-wide ViT is none of {', '.join(ARCHS)}; give its number of attention heads "
            "(num_heads=..., --num-heads)"
        )
    spec = ARCHS[arch or "vit_small"]
    model: dict[str, Any] = {"arch": arch or "vit_small", "patch_size": patch, "img_size": side * patch}
    if width != spec.width:
        model["embed_dim"] = width
    if max(blocks) + 1 != spec.depth:  # a gap in the block numbers shows up as missing weights
        model["depth"] = max(blocks) + 1
    if heads != spec.heads:
        model["num_heads"] = heads
    selfpatch: dict[str, Any] = {"border": "wrap" if side >= 3 else "valid"}
    if aggregation is not None:
        selfpatch["num_blocks"] = len({m.group(1) for k in aggregation if (m := re.match(r"cls_blocks\.(\d+)\.", k))})
    if isinstance(args.get("k_num"), int) and 1 <= args["k_num"] <= 8:
        selfpatch["k"] = args["k_num"]
    data = {
        "method": "dino" if has_cls else "selfpatch",
        "model": model,
        "selfpatch": selfpatch,
        "crops": {"global_size": side * patch, "local_size": patch * max(3, round(side * 96 / 224))},
    }
    try:
        return validate_config(data)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: cannot describe the model its tensors hold: {exc}") from exc


# ----------------------------------------------------------------------------------------------- internals


def _names(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _heads_from_args(args: Mapping[str, Any], width: int) -> int | None:
    """Heads of the official `--arch` (SelfPatch spells ViTs 'deit_*'), when that arch has this width."""
    arch = str(args.get("arch", "")).replace("deit", "vit")
    return ARCHS[arch].heads if arch in ARCHS and ARCHS[arch].width == width else None


def _manifest_of(path: Path) -> Path | None:
    """The manifest an export path stands for: the folder's, the manifest itself, or a listed file's sibling."""
    if path.is_dir():
        return path / MANIFEST if (path / MANIFEST).is_file() else None
    if path.name == MANIFEST:
        return path
    if path.name in EXPORT_FILES.values() and (path.parent / MANIFEST).is_file():
        return path.parent / MANIFEST
    return None


def _load_file(path: Path) -> dict[str, Any]:
    """A torch file (weights_only) or a safetensors file, as a dict."""
    if path.suffix != ".safetensors":
        return load_checkpoint(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc


def _read_export(manifest_path: Path) -> Weights:
    manifest = read_manifest(manifest_path)
    cfg = config_of(manifest.get("config"), manifest_path)
    files = manifest.get("files") or {}
    for fmt in BACKBONE_FORMATS:
        if files.get(fmt):
            path, digest = _listed_file(manifest_path, files[fmt], fmt)
            weights = _load_file(path)
            if not all(isinstance(v, torch.Tensor) for v in weights.values()):
                raise CheckpointError(f"{path} is not a plain state dict of tensors")
            aggregation = None
            if cfg.method == "selfpatch" and files.get("aggregation"):  # its image token works from an export
                agg_path, _ = _listed_file(manifest_path, files["aggregation"], "aggregation")
                aggregation = _namespace(_load_file(agg_path), "")
            source = manifest.get("source_checkpoint") or {}
            meta: dict[str, Any] = {k: source[k] for k in ("epoch", "iteration") if k in source}
            meta.update(git_commit=manifest.get("git_commit"), metrics=manifest.get("training_metrics", {}))
            backbone = _namespace(strip_prefixes(weights), "")
            return Weights(cfg, backbone, aggregation, digest, str(path), "export", digest, meta)
    raise CheckpointError(f"{manifest_path} lists no {' or '.join(EXPORT_FILES[f] for f in BACKBONE_FORMATS)} export")


def _listed_file(manifest_path: Path, entry: Any, fmt: str) -> tuple[Path, str]:
    """A file the manifest lists, checked against its sha256: (path, sha256)."""
    name = entry.get("path", EXPORT_FILES[fmt]) if isinstance(entry, dict) else EXPORT_FILES[fmt]
    path = manifest_path.parent / name
    if not path.is_file():
        raise CheckpointError(f"{path} is listed in {manifest_path} but missing")
    digest = sha256_file(path)
    expected = entry.get("sha256") if isinstance(entry, dict) else None
    if expected and expected != digest:
        raise CheckpointError(f"{path} is corrupt: sha256 {digest[:16]} differs from the manifest's")
    return path, digest


def _read_state(state: dict[str, Any], source: str, digest: str, key: str, num_heads: int | None) -> Weights:
    """Recognise the layout of a loaded file and split it into backbone / aggregation module."""
    keyed = f"{digest}:{key}" if key != "teacher" else digest
    if isinstance(state.get("config"), dict) and ("teacher" in state or "student" in state):
        cfg = config_of(state["config"], source)
        backbone, aggregation = _training_network(state, key, source)
        if cfg.method == "selfpatch":
            _require_aggregation(aggregation, source)
        meta: dict[str, Any] = {k: state[k] for k in ("epoch", "iteration", "git_commit", "metrics") if k in state}
        return Weights(cfg, backbone, aggregation, keyed, source, "trainer", digest, meta)
    if "teacher" in state and "student" in state:  # official DINO / SelfPatch; args is an argparse.Namespace
        backbone, aggregation = _training_network(state, key, source)
        if "cls_token" not in backbone:  # the SelfPatch backbone: its training checkpoint holds ca_head
            _require_aggregation(aggregation, source)
        args = vars(state["args"]) if hasattr(state.get("args"), "__dict__") else dict(state.get("args") or {})
        cfg, identity = _inferred(backbone, aggregation, num_heads, args, source, keyed)
        meta = {k: state[k] for k in ("epoch",) if isinstance(state.get(k), int)}
        return Weights(cfg, backbone, aggregation, identity, source, "official", digest, meta)
    if key != "teacher":
        raise CheckpointError(f"{source} holds one network, not a {key!r} one (keys found: {_names(sorted(state))})")
    if isinstance(state.get("teacher"), dict):
        backbone, aggregation = _training_network(state, "teacher", source)
        cfg, identity = _inferred(backbone, aggregation, num_heads, {}, source, digest)
        return Weights(cfg, backbone, aggregation, identity, source, "teacher", digest)
    inner = next((state[c] for c in CONTAINERS if isinstance(state.get(c), dict)), state)
    weights = _namespace(strip_prefixes(inner), "")
    if any(k.startswith("backbone.") for k in weights):
        layout = "mm"
        backbone, aggregation = _namespace(weights, "backbone."), _namespace(weights, "ca_head.") or None
    else:
        layout = "timm"
        backbone, aggregation = {k: v for k, v in weights.items() if not k.startswith("head.")}, None
    cfg, identity = _inferred(backbone, aggregation, num_heads, {}, source, digest)
    return Weights(cfg, backbone, aggregation, identity, source, layout, digest)


def _require_aggregation(aggregation: StateDict | None, source: str) -> None:
    if not aggregation:
        raise CheckpointError(f"{source}: no 'ca_head.*' weights in the checkpoint")


def _training_network(state: dict[str, Any], key: str, source: str) -> tuple[StateDict, StateDict | None]:
    """Backbone and aggregation module of one network of a training layout; unknown namespaces are errors."""
    if key not in state:
        raise CheckpointError(f"{source} has no {key!r} network (keys found: {_names(sorted(map(str, state)))})")
    if not isinstance(state[key], dict):
        raise CheckpointError(f"{source}: '{key}' is not a state dict")
    weights = strip_prefixes(state[key])
    if not any(k.startswith("backbone.") for k in weights):  # a bare backbone saved under the key
        weights = {f"backbone.{k}": v for k, v in weights.items() if not k.startswith("head.")}
    known = HEAD_NAMESPACES | {"backbone", "ca_head"}
    unknown = sorted(k for k in weights if k.split(".", 1)[0] not in known)
    if unknown:
        raise CheckpointError(f"{source}: unexpected weights under {key!r}: {_names(unknown)}")
    backbone = _namespace(weights, "backbone.")
    if not backbone:
        raise CheckpointError(f"{source}: no 'backbone.*' weights in the checkpoint")
    return backbone, _namespace(weights, "ca_head.") or None


def _namespace(weights: Mapping[str, Any], prefix: str) -> StateDict:
    """The tensors under `prefix`, renamed without it, as contiguous float32 where floating."""
    return {
        k.removeprefix(prefix): (v.float() if v.is_floating_point() else v).contiguous()
        for k, v in weights.items()
        if k.startswith(prefix) and isinstance(v, torch.Tensor)
    }


def _inferred(
    backbone: StateDict,
    aggregation: StateDict | None,
    num_heads: int | None,
    args: Mapping[str, Any],
    source: str,
    identity: str,
) -> tuple[TrainConfig, str]:
    """The inferred config; an explicit head count joins the identity, since it changes the features."""
    cfg = infer_config(backbone, aggregation, num_heads=num_heads, args=args, source=source)
    return cfg, f"{identity}:heads={num_heads}" if num_heads else identity


def _checked(record: Weights) -> Weights:
    """The record, once its tensors match the modules its config describes (built on the meta device)."""
    cfg = record.config
    model = "the model its config describes" if record.layout in ("trainer", "export") else "the ViT its tensors imply"
    with torch.device("meta"):
        vit = build_backbone(cfg.model, cfg.method, cfg.img_size, drop_path_rate=0.0)
        head = AggregationHead.from_config(cfg) if record.aggregation is not None else None
    check_state_dict(vit.state_dict(), record.backbone, "backbone", record.source, model)
    if cfg.method == "dino" and record.aggregation is not None:
        raise CheckpointError(f"{record.source}: unexpected 'ca_head.*' weights next to a DINO backbone")
    if head is not None and record.aggregation is not None:
        check_state_dict(head.state_dict(), record.aggregation, "aggregation module (ca_head)", record.source, model)
    return record
