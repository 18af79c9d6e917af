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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
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


class SourcesError(FileNotFoundError):
    """The Debian source images are missing (run scripts/fetch_composite_sources.sh)."""


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
    """Write a composites dataset to `out` and return its meta.json content."""
    from pycocotools import mask as mask_utils
    from tqdm import tqdm

    sources, out = Path(sources), Path(out)
    stamps = find_stamps(sources)
    splits = split_sources(stamps)
    categories = [{"id": i, "name": name, "supercategory": "object"} for i, name in enumerate(CLASSES, start=1)]
    summary: dict[str, Any] = {}
    for split_code, split in enumerate(SPLITS):
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
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def _sources_manifest(sources: Path) -> list[str]:
    listing = sources / "SOURCES.txt"
    return listing.read_text().splitlines() if listing.is_file() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluator.composites",
        description=f"Generate {NAME}: {DESCRIPTION}. Deterministic for a given seed; train and val share no "
        "cut-out and no background. Fetch the sources first: scripts/fetch_composite_sources.sh data",
    )
    parser.add_argument("--sources", type=Path, default=Path("data/composite-sources"), help="unpacked Debian sources")
    parser.add_argument("--out", type=Path, default=Path("data/composites"), help="output dataset folder")
    parser.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--val", type=int, default=250, help="validation images (default 250)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
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
    for split, info in meta["splits"].items():
        print(
            f"{split}: {info['images']} images, {info['instances']} instances, {len(info['cutouts'])} cut-outs, "
            f"{len(info['backgrounds'])} backgrounds"
        )
    print(f"wrote {args.out} ({NAME}; never call it COCO)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
