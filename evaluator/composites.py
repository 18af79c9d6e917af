"""Synthetic composites: real photo cut-outs pasted onto real background photos (detection + segmentation).

No registry ships a real COCO-like set, so the dense benchmarks get this honest stand-in (recipe in
../shared/docs/offline-data.md). Always call it "synthetic composites" (the full phrase: synthetic cut-paste
composites of real photo cut-outs (Tux Paint stamps) on real photos); never call it COCO and never compare
its numbers with COCO or ADE20K numbers.

Sources (Debian packages, fetched by scripts/fetch_composite_sources.sh, nothing installed):
  * objects: the photographic stamps of `tuxpaint-stamps-default` (GPL-2); the alpha channel is an exact
    mask; class = coarse folder (mammal, bird, fish, insect, flower, fruit, vegetable, vehicle);
  * backgrounds: real photos from `tuxpaint-data` templates, `mate-backgrounds` (nature) and
    `plasma-workspace-wallpapers`, leaving out every photo that shows a target class (BACKGROUND_EXCLUDED).

Per image: a random square crop of one background resized to size x size, 1-6 objects (longest side 15-60 %
of the image, flip, +-20 degree rotation, brightness 0.7-1.3, may run off the edge), pasted with their
real alpha in z-order; each new mask is subtracted from the older ones. Instances left with < 30 % of their
area or < 64 px are dropped from the COCO file and marked 255 (ignore) in the semantic map. Boxes come from
the visible mask. Train and val share no cut-out (mirrored variants count as the same cut-out) and no
background; every image depends only on (seed, split, index), so the output is deterministic.

Output, in the COCO and ADE20K layouts the loaders read:
  meta.json                                  name, classes (0 = background), splits, sources
  images/{train,val}/NNNNNN.jpg
  annotations/instances_{train,val}.json     COCO instances, RLE masks
  annotations/{train,val}/NNNNNN.png         semantic map: 0 background, k class, 255 ignore

The optional `pretrain` split (`study()`, `python -m evaluator.composites study`) adds unlabelled scene-like
images for self-supervised pretraining, in the ImageFolder layout the trainer reads with
`data.dataset=imagefolder data.path=<out>/pretrain` (torchvision's ImageFolder needs one class level):
  pretrain/unlabeled/NNNNNN.jpg
  pretrain/provenance.json                   per image: background, pasted cut-outs, sha256
Pretrain images draw on the probe-train sources (like ImageNet pretraining followed by a probe trained on
ImageNet train): the sources are too few for a third disjoint pool (7 insect and 7 fish cut-outs, 33
backgrounds), and val stays fully held out from both. Their own split code makes every image new; a
content-hash check refuses any pretrain image equal to a probe image. docs/data-card-composites.md has
the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from trainer.files import atomic_write_text

NAME = "synthetic composites"
DESCRIPTION = (
    "synthetic cut-paste composites of real photo cut-outs (Tux Paint stamps) on real photos; "
    "not COCO, not comparable with COCO or ADE20K numbers"
)
GENERATOR_VERSION = 1
STAMPS_DIR = "tuxpaint-stamps-default/usr/share/tuxpaint/stamps"
#: Coarse class -> stamp folders (relative to STAMPS_DIR, sub-folders included).
CLASS_FOLDERS: dict[str, tuple[str, ...]] = {
    "mammal": ("animals/mammals",),
    "bird": ("animals/birds",),
    "fish": ("animals/fish",),
    "insect": ("animals/insects",),
    "flower": ("plants/flowers",),
    "fruit": ("food/fruit",),
    "vegetable": ("food/vegetables",),
    "vehicle": ("vehicles",),
}
CLASSES = tuple(CLASS_FOLDERS)
#: Path parts that mark drawings or toys rather than photos.
STAMP_EXCLUDED_PARTS = frozenset({"cartoon", "toys", "plastic", "symbols"})
#: Real photos used as backgrounds (relative to the sources root).
BACKGROUNDS: tuple[str, ...] = tuple(
    [
        f"tuxpaint-data/usr/share/tuxpaint/templates/{n}.jpg"
        for n in (
            "burnt_bark",
            "cliff",
            "lighthouse",
            "mossy_bark",
            "mossy_log",
            "mudstone",
            "ocean_splash",
            "ocean_waves",
            "redwoods_above",
            "rocks",
            "spiders_web",
            "sun_behind_clouds",
            "sun_behind_leaves",
            "trees_above",
            "trees_at_dusk",
            "wool_mill_machine",
        )
    ]
    + [
        f"mate-backgrounds/usr/share/backgrounds/mate/nature/{n}.jpg"
        for n in ("Aqua", "Blinds", "Dune", "GreenMeadow", "RainDrops", "Storm", "Wood")
    ]
    + [
        f"plasma-workspace-wallpapers/usr/share/wallpapers/{n}"
        for n in (
            "BytheWater",
            "ColdRipple",
            "ColorfulCups",
            "DarkestHour",
            "FallenLeaf",
            "Grey",
            "Kite",
            "OneStandsOut",
            "Path",
            "summer_1am",
        )
    ]
)
#: Real photos left out because they show a target class (they would be unlabelled positives).
BACKGROUND_EXCLUDED: dict[str, str] = {
    "tuxpaint-data templates/sheep.jpg": "sheep (mammal)",
    "tuxpaint-data templates/corn_maze.jpg": "corn plants (vegetable)",
    "tuxpaint-data templates/jellyfish.jpg": "sea animals, next to the fish class",
    "mate-backgrounds nature/FreshFlower.jpg": "flower",
    "mate-backgrounds nature/Garden.jpg": "flower",
    "mate-backgrounds nature/YellowFlower.jpg": "flower",
    "mate-backgrounds nature/LadyBird.jpg": "ladybird (insect) on flowers",
    "mate-backgrounds nature/TwoWings.jpg": "flowers and seed head",
    "plasma-workspace-wallpapers EveningGlow": "rowing boats (vehicle)",
    "plasma-workspace-wallpapers (others)": "illustrations, not photos",
}
MIN_STAMP_SIDE = 48
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 64
SPLITS = ("train", "val")
PRETRAIN = "pretrain"
#: The probe split whose cut-outs and backgrounds the pretrain split reuses; val shares none with either.
PRETRAIN_SOURCES = "train"
#: The single class folder of the pretrain ImageFolder (its label means nothing).
PRETRAIN_CLASS = "unlabeled"
#: Random-stream code of each split: train and val keep their version-1 codes, pretrain gets a new one.
SPLIT_CODES = {"train": 0, "val": 1, PRETRAIN: 2}
#: `study` defaults for a 2-core CPU: a few thousand 96-px pretraining images, a few hundred per probe split.
STUDY_COUNTS = {PRETRAIN: 4000, "train": 400, "val": 200}
STUDY_SIZE = 96
DISJOINTNESS = (
    "train and val share no cut-out (mirrored variants count as one) and no background; pretrain reuses the "
    "train cut-outs and backgrounds but no image (own random stream, content hashes checked), so val is held "
    "out from both pretraining and probe training"
)
_NUMBERED = re.compile(r"\d{6}\.(jpg|png)")


class SourcesError(FileNotFoundError):
    """The Debian source images are missing (run scripts/fetch_composite_sources.sh)."""


class DisjointnessError(RuntimeError):
    """A pretraining image equals a probe image: pretraining would have seen evaluation data."""


@dataclass(frozen=True)
class Stamp:
    path: str  # relative to the sources root
    label: int  # 1-based class index
    group: str  # cut-out identity: mirrored variants share it


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def is_photographic(image: Image.Image) -> bool:
    """The recipe's filter: >= 400 quantised colours and median local gradient >= 3 over opaque pixels."""
    rgba = np.asarray(image.convert("RGBA"))
    opaque = rgba[..., 3] >= 128
    if opaque.sum() < 100:
        return False
    rgb = rgba[..., :3][opaque] >> 3  # 32 levels per channel
    colours = len(np.unique(rgb[:, 0].astype(np.int32) * 1024 + rgb[:, 1].astype(np.int32) * 32 + rgb[:, 2]))
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    gx = np.abs(np.diff(grey, axis=1))[:-1, :]
    gy = np.abs(np.diff(grey, axis=0))[:, :-1]
    inner = opaque[:-1, :-1] & opaque[1:, :-1] & opaque[:-1, 1:]
    gradient = float(np.median((gx + gy)[inner])) if inner.any() else 0.0
    return colours >= 400 and gradient >= 3.0


def find_stamps(sources: Path) -> list[Stamp]:
    """Photographic RGBA stamps of the target classes, sorted by path."""
    root = sources / STAMPS_DIR
    if not root.is_dir():
        raise SourcesError(f"{root} not found: run scripts/fetch_composite_sources.sh {sources.parent}")
    stamps = []
    for label, (_, folders) in enumerate(CLASS_FOLDERS.items(), start=1):
        for folder in folders:
            for path in sorted((root / folder).rglob("*.png")):
                rel = path.relative_to(root)
                if STAMP_EXCLUDED_PARTS & set(rel.parts):
                    continue
                with Image.open(path) as image:
                    if image.mode != "RGBA" or min(image.size) < MIN_STAMP_SIDE or not is_photographic(image):
                        continue
                group = f"{rel.parent}/{rel.stem.removesuffix('_mirror')}"
                stamps.append(Stamp(str(path.relative_to(sources)), label, group))
    if not stamps:
        raise SourcesError(f"no photographic stamps under {root}")
    return stamps


def background_path(sources: Path, entry: str) -> Path:
    """The file of a background entry (a wallpaper folder resolves to its largest image)."""
    path = sources / entry
    if path.suffix:
        if not path.is_file():
            raise SourcesError(f"background {path} not found: run scripts/fetch_composite_sources.sh")
        return path
    images = sorted((path / "contents" / "images").glob("*.jpg"))
    if not images:
        raise SourcesError(f"wallpaper {path} has no images: run scripts/fetch_composite_sources.sh")

    def pixels(p: Path) -> int:
        width, _, height = p.stem.partition("x")
        return int(width) * int(height) if width.isdigit() and height.isdigit() else 0

    return max(images, key=lambda p: (pixels(p), p.name))


def background_name(entry: str) -> str:
    return Path(entry).stem if Path(entry).suffix else Path(entry).name


def split_items(names: list[str], every: int = 4) -> dict[str, set[str]]:
    """Deterministic split: sorted by name hash, every `every`-th goes to val (at least one when >= 2 items)."""
    ordered = sorted(set(names), key=_hash)
    val = {n for i, n in enumerate(ordered) if i % every == 0} if len(ordered) >= 2 else set()
    return {"train": set(ordered) - val, "val": val}


def split_sources(stamps: list[Stamp]) -> dict[str, dict[str, list[Any]]]:
    """Per split, the stamps (stratified by class, by cut-out group) and the backgrounds."""
    out: dict[str, dict[str, list[Any]]] = {s: {"stamps": [], "backgrounds": []} for s in SPLITS}
    for label in range(1, len(CLASSES) + 1):
        in_class = [s for s in stamps if s.label == label]
        groups = split_items([s.group for s in in_class])
        for split in SPLITS:
            out[split]["stamps"] += [s for s in in_class if s.group in groups[split]]
    names = {background_name(b): b for b in BACKGROUNDS}
    for split, chosen in split_items(list(names)).items():
        out[split]["backgrounds"] = sorted(names[n] for n in chosen)
    for split in SPLITS:
        out[split]["stamps"].sort(key=lambda s: s.path)
    return out


@lru_cache(maxsize=512)
def _load_stamp(path: str) -> Image.Image:
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    bbox = rgba.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox()
    if bbox:
        rgba = rgba.crop(bbox)
    if max(rgba.size) > 512:
        scale = 512 / max(rgba.size)
        rgba = rgba.resize(
            (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))), Image.Resampling.LANCZOS
        )
    return rgba


@lru_cache(maxsize=64)
def _load_background(path: str) -> Image.Image:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if max(rgb.size) > 1024:
        scale = 1024 / max(rgb.size)
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
    return rgb


@dataclass
class _Instance:
    label: int
    cutout: str
    visible: np.ndarray  # (size, size) bool
    full_area: int


def compose(
    sources: Path, stamps: list[Stamp], backgrounds: list[str], rng: np.random.Generator, size: int
) -> tuple[Image.Image, list[_Instance], str]:
    """One composite: the image, its instances (visible masks, z-order applied) and the background used."""
    entry = backgrounds[int(rng.integers(len(backgrounds)))]
    photo = _load_background(str(background_path(sources, entry)))
    side = int(rng.uniform(0.5, 1.0) * min(photo.size))
    left = int(rng.integers(0, photo.width - side + 1))
    top = int(rng.integers(0, photo.height - side + 1))
    canvas = (
        photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC).convert("RGBA")
    )
    instances: list[_Instance] = []
    for _ in range(int(rng.integers(1, 7))):
        stamp = stamps[int(rng.integers(len(stamps)))]
        image = _load_stamp(str(sources / stamp.path))
        target = rng.uniform(0.15, 0.6) * size
        scale = target / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
        )
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        image = image.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BICUBIC, expand=True)
        pixels = np.asarray(image).astype(np.float32)
        pixels[..., :3] = np.clip(pixels[..., :3] * rng.uniform(0.7, 1.3), 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8), mode="RGBA")
        full_area = int((pixels[..., 3] >= 128).sum())
        if full_area == 0:
            continue
        x = round(rng.uniform(0, size) - image.width / 2)
        y = round(rng.uniform(0, size) - image.height / 2)
        layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        layer.paste(image, (x, y))
        canvas = Image.alpha_composite(canvas, layer)
        mask = np.asarray(layer.getchannel("A")) >= 128
        for older in instances:
            older.visible &= ~mask
        instances.append(_Instance(stamp.label, stamp.path, mask.copy(), full_area))
    return canvas.convert("RGB"), instances, background_name(entry)


def generate(
    sources: Path | str,
    out: Path | str,
    counts: dict[str, int],
    *,
    size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a composites dataset to `out` and return its meta.json content.

    `counts` maps train / val (and optionally pretrain) to image counts; without pretrain the output is
    exactly that of generator version 1.
    """
    from pycocotools import mask as mask_utils
    from tqdm import tqdm

    unknown = set(counts) - {*SPLITS, PRETRAIN}
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}: expected {', '.join((*SPLITS, PRETRAIN))}")
    sources, out = Path(sources), Path(out)
    stamps = find_stamps(sources)
    splits = split_sources(stamps)
    categories = [{"id": i, "name": name, "supercategory": "object"} for i, name in enumerate(CLASSES, start=1)]
    summary: dict[str, Any] = {}
    for split in SPLITS:
        split_code = SPLIT_CODES[split]
        n = counts.get(split, 0)
        pool, backgrounds = splits[split]["stamps"], splits[split]["backgrounds"]
        if n and (not pool or not backgrounds):
            raise SourcesError(f"split {split} has {len(pool)} stamps and {len(backgrounds)} backgrounds")
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        dropped = 0
        for index in tqdm(range(n), desc=f"composites {split}", disable=not progress, leave=False):
            rng = np.random.default_rng([seed, split_code, index])
            image, instances, background = compose(sources, pool, backgrounds, rng, size)
            stem = f"{index:06d}"
            image_id = index + 1
            semantic = np.zeros((size, size), dtype=np.uint8)
            for inst in instances:
                area = int(inst.visible.sum())
                if area < MIN_VISIBLE_PIXELS or area < MIN_VISIBLE_FRACTION * inst.full_area:
                    semantic[inst.visible] = 255
                    dropped += 1
                    continue
                semantic[inst.visible] = inst.label
                rle = mask_utils.encode(np.asfortranarray(inst.visible.astype(np.uint8)))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": inst.label,
                        "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                        "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                        "iscrowd": 0,
                        "cutout": inst.cutout,
                    }
                )
            image.save(out / "images" / split / f"{stem}.jpg", quality=95, subsampling=0)
            Image.fromarray(semantic).save(out / "annotations" / split / f"{stem}.png")
            images.append(
                {"id": image_id, "file_name": f"{stem}.jpg", "width": size, "height": size, "background": background}
            )
        coco = {
            "info": {"description": f"{NAME}: {DESCRIPTION}", "version": str(GENERATOR_VERSION), "seed": seed},
            "licenses": [{"id": 1, "name": "GPL-2 (Debian sources: tuxpaint-stamps-default, tuxpaint-data, ...)"}],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        text = json.dumps(coco, separators=(",", ":"))
        atomic_write_text(out / "annotations" / f"instances_{split}.json", text)
        summary[split] = {
            "images": n,
            "instances": len(annotations),
            "dropped_instances": dropped,
            "cutouts": sorted({s.path for s in pool}),
            "backgrounds": [background_name(b) for b in backgrounds],
        }
    if PRETRAIN in counts:
        shared = splits[PRETRAIN_SOURCES]
        summary[PRETRAIN] = _write_pretrain(
            sources, out, counts[PRETRAIN], shared["stamps"], shared["backgrounds"], size, seed, progress
        )
        _check_content_disjoint(out, {s: counts.get(s, 0) for s in SPLITS})
    meta = {
        "name": NAME,
        "description": DESCRIPTION,
        "classes": ["background", *CLASSES],
        "ignore_index": 255,
        "reduce_zero_label": False,
        "generator": {"module": "evaluator.composites", "version": GENERATOR_VERSION, "seed": seed, "size": size},
        "sources": _sources_manifest(sources),
        "splits": summary,
    }
    if PRETRAIN in counts:
        meta["disjointness"] = DISJOINTNESS
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def _write_pretrain(
    sources: Path,
    out: Path,
    n: int,
    stamps: list[Stamp],
    backgrounds: list[str],
    size: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """The unlabelled pretrain images, an ImageFolder with one class, and their provenance."""
    from tqdm import tqdm

    if n and (not stamps or not backgrounds):
        raise SourcesError(f"split {PRETRAIN} has {len(stamps)} stamps and {len(backgrounds)} backgrounds")
    folder = out / PRETRAIN / PRETRAIN_CLASS
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder, n, ".jpg")  # ImageFolder would count leftovers of a bigger earlier run
    records: list[dict[str, Any]] = []
    pasted = 0
    for index in tqdm(range(n), desc=f"composites {PRETRAIN}", disable=not progress, leave=False):
        rng = np.random.default_rng([seed, SPLIT_CODES[PRETRAIN], index])
        image, instances, background = compose(sources, stamps, backgrounds, rng, size)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95, subsampling=0)
        data = buffer.getvalue()
        name = f"{index:06d}.jpg"
        (folder / name).write_bytes(data)
        pasted += len(instances)
        records.append(
            {
                "file": f"{PRETRAIN_CLASS}/{name}",
                "background": background,
                "cutouts": [inst.cutout for inst in instances],
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    provenance = {"name": NAME, "version": GENERATOR_VERSION, "seed": seed, "size": size, "images": records}
    atomic_write_text(out / PRETRAIN / "provenance.json", json.dumps(provenance, separators=(",", ":")))
    return {
        "images": n,
        "folder": f"{PRETRAIN}/{PRETRAIN_CLASS}",
        "labels": None,
        "sources_from": PRETRAIN_SOURCES,
        "pasted_cutouts": pasted,
        "cutouts": sorted({s.path for s in stamps}),
        "backgrounds": [background_name(b) for b in backgrounds],
    }


def _remove_stale(folder: Path, keep: int, suffix: str) -> None:
    """Delete numbered files at index >= keep, so a folder holds exactly one run's images."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if _NUMBERED.fullmatch(path.name) and path.suffix == suffix and int(path.stem) >= keep:
            path.unlink()


def _check_content_disjoint(out: Path, counts: dict[str, int]) -> None:
    """Refuse a dataset whose pretrain folder holds a probe image, byte for byte."""
    provenance = json.loads((out / PRETRAIN / "provenance.json").read_text())
    pretrain = {r["sha256"]: r["file"] for r in provenance["images"]}
    for split, n in counts.items():
        for index in range(n):
            path = out / "images" / split / f"{index:06d}.jpg"
            found = pretrain.get(hashlib.sha256(path.read_bytes()).hexdigest())
            if found:
                raise DisjointnessError(f"pretrain image {found} equals probe image {path}")


def study(
    sources: Path | str,
    out: Path | str,
    *,
    pretrain: int = STUDY_COUNTS[PRETRAIN],
    train: int = STUDY_COUNTS["train"],
    val: int = STUDY_COUNTS["val"],
    size: int = STUDY_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """A pretraining study set in one call: unlabelled scene-like images plus disjoint probe splits.

    The defaults fit a 2-core CPU study (see docs/data-card-composites.md); returns meta.json's content.
    """
    out = Path(out)
    for split, n in (("train", train), ("val", val)):  # a rerun with fewer images leaves no strays
        _remove_stale(out / "images" / split, n, ".jpg")
        _remove_stale(out / "annotations" / split, n, ".png")
    counts = {"train": train, "val": val, PRETRAIN: pretrain}
    return generate(sources, out, counts, size=size, seed=seed, progress=progress)


def _sources_manifest(sources: Path) -> list[str]:
    listing = sources / "SOURCES.txt"
    return listing.read_text().splitlines() if listing.is_file() else []


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    if args_list[:1] == ["study"]:
        return _study_main(args_list[1:])
    parser = argparse.ArgumentParser(
        prog="python -m evaluator.composites",
        description=f"Generate {NAME}: {DESCRIPTION}. Deterministic for a given seed; train and val share no "
        "cut-out and no background. Fetch the sources first: scripts/fetch_composite_sources.sh data",
        epilog="`python -m evaluator.composites study --help`: the pretraining study set (unlabelled "
        "pretrain images plus probe splits) in one command.",
    )
    parser.add_argument("--sources", type=Path, default=Path("data/composite-sources"), help="unpacked Debian sources")
    parser.add_argument("--out", type=Path, default=Path("data/composites"), help="output dataset folder")
    parser.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--val", type=int, default=250, help="validation images (default 250)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(args_list)
    if min(args.train, args.val) < 0 or args.size < 32:
        print("error: image counts must be >= 0 and --size >= 32", file=sys.stderr)
        return 2
    try:
        meta = generate(
            args.sources,
            args.out,
            {"train": args.train, "val": args.val},
            size=args.size,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
    except SourcesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_summary(meta)
    print(f"wrote {args.out} ({NAME}; never call it COCO)")
    return 0


def _print_summary(meta: dict[str, Any]) -> None:
    for split, info in meta["splits"].items():
        if split == PRETRAIN:
            objects = f"{info['pasted_cutouts']} pasted cut-outs (unlabelled)"
        else:
            objects = f"{info['instances']} instances"
        print(
            f"{split}: {info['images']} images, {objects}, {len(info['cutouts'])} cut-outs, "
            f"{len(info['backgrounds'])} backgrounds"
        )


def _study_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluator.composites study",
        description=f"Generate a pretraining study set of {NAME}: unlabelled scene-like images for the trainer "
        f"(ImageFolder <out>/{PRETRAIN}) plus probe splits in the COCO / ADE20K layouts (<out>). {DISJOINTNESS}. "
        "See docs/data-card-composites.md.",
    )
    parser.add_argument("--sources", type=Path, default=Path("data/composite-sources"), help="unpacked Debian sources")
    parser.add_argument("--out", type=Path, default=Path("data/composites-study"), help="output dataset folder")
    for split, what in ((PRETRAIN, "unlabelled pretraining"), ("train", "probe-train"), ("val", "probe-val")):
        default = STUDY_COUNTS[split]
        parser.add_argument(f"--{split}", type=int, default=default, help=f"{what} images (default {default})")
    parser.add_argument("--size", type=int, default=STUDY_SIZE, help=f"image side in pixels (default {STUDY_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.pretrain, args.train, args.val) < 0 or args.size < 32:
        print("error: image counts must be >= 0 and --size >= 32", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        meta = study(
            args.sources,
            args.out,
            pretrain=args.pretrain,
            train=args.train,
            val=args.val,
            size=args.size,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
    except (SourcesError, DisjointnessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_summary(meta)
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s ({NAME}; never call it COCO)")
    print(f"  pretrain: python -m trainer ... data.dataset=imagefolder data.path={args.out / PRETRAIN}")
    print(f"  probes:   python -m evaluator det|seg ... --data {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
