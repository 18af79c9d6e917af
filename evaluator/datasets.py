"""Evaluation datasets in standard layouts, so users point the benchmarks at the real sets.

* Classification (k-NN, linear): Fashion-MNIST idx files, or an ImageNet-style root with `train/` and
  `val/` class folders.
* Detection / instance segmentation: COCO layout, `annotations/instances_<split>.json` plus an image folder
  (`<split>/` or `images/<split>/`), e.g. `instances_val2017.json` + `val2017/`.
* Semantic segmentation: ADE20K layout, `images/<split>/*.jpg` + `annotations/<split>/*.png`
  (`training`/`validation`), class names from `meta.json` or ADE20K's `objectInfo150.csv`.

The synthetic composites (`evaluator.composites`) are written in these same layouts with a `meta.json`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from trainer.data.datasets import FASHION_MNIST_FILES, DatasetError, FashionMNIST, ImageFolder

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Accepted names for each split, first match wins (ours, COCO-2017, ADE20K).
SPLIT_ALIASES = {
    "train": ("train", "train2017", "training"),
    "val": ("val", "val2017", "validation"),
    "test": ("test", "test2017", "t10k"),
}


def split_names(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


def _read_meta(root: Path) -> dict[str, Any]:
    path = root / "meta.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold a JSON object")
    return meta


# ------------------------------------------------------------------------------------------ classification


@dataclass
class ClassificationSplit:
    """A labelled image set with a stable id (the feature-cache key uses it)."""

    dataset: Dataset[tuple[Image.Image, int]]
    dataset_id: str
    num_classes: int
    labels: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> ClassificationSplit:
        """A seeded random subset of n images (all of them when n is None or too large)."""
        if n is None or n >= len(self.labels):
            return self
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self.labels), generator=generator)[:n].sort().values.tolist()
        return ClassificationSplit(
            Subset(self.dataset, index), f"{self.dataset_id}:subset{n}:seed{seed}", self.num_classes, self.labels[index]
        )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def is_fashion_mnist(root: Path) -> bool:
    names = FASHION_MNIST_FILES["train"][0]
    return (root / names).exists() or (root / names.removesuffix(".gz")).exists()


def classification_split(root: Path | str, split: str) -> ClassificationSplit:
    """`split` (train, val/test) of Fashion-MNIST idx files or of an ImageNet-style folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if is_fashion_mnist(root):
        fm_split = "train" if split == "train" else "test"
        fm = FashionMNIST(root, fm_split)
        images = root / FASHION_MNIST_FILES[fm_split][0]
        images = images if images.exists() else images.with_suffix("")
        return ClassificationSplit(
            fm, f"fashion_mnist:{fm_split}:{_file_digest(images)}", len(fm.classes), np.asarray(fm.targets)
        )
    for name in split_names(split) + (("val", "test") if split == "test" else ()):
        folder = root / name
        if folder.is_dir():
            dataset = ImageFolder(folder)
            listing = "\n".join(f"{Path(p).relative_to(folder)}:{Path(p).stat().st_size}" for p, _ in dataset.samples)
            digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
            labels = np.asarray([t for _, t in dataset.samples], dtype=np.int64)
            return ClassificationSplit(dataset, f"imagefolder:{folder.name}:{digest}", len(dataset.classes), labels)
    raise DatasetError(
        f"{root} holds neither Fashion-MNIST idx files nor a '{split}' class-folder split "
        f"(looked for {', '.join(split_names(split))})"
    )


# ------------------------------------------------------------------------------------------------- COCO


def find_coco_files(root: Path, split: str) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of a COCO-layout split."""
    root = Path(root)
    for name in split_names(split):
        ann = root / "annotations" / f"instances_{name}.json"
        if ann.is_file():
            for folder in (root / name, root / "images" / name):
                if folder.is_dir():
                    return ann, folder
            raise DatasetError(f"{ann} found but no image folder {root / name} or {root / 'images' / name}")
    raise DatasetError(
        f"no COCO annotations for split '{split}' under {root}/annotations "
        f"(looked for instances_{{{','.join(split_names(split))}}}.json)"
    )


def quiet_coco(ann_file: Path | str | None = None) -> Any:
    """A pycocotools COCO object without its prints on stdout (the CLI's --output json stays clean)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file)) if ann_file is not None else COCO()


class CocoInstances(Dataset[tuple[Image.Image, dict[str, Any]]]):
    """COCO instances as (PIL image, target) with torchvision detection targets.

    target: boxes (N, 4) xyxy float, labels (N,) in 1..K (contiguous, 0 is background), masks (N, H, W)
    uint8, image_id. Crowd and empty-box annotations are left out of the targets (as torchvision's
    reference scripts do); COCOeval still sees them through `coco`.
    """

    def __init__(self, root: Path | str, split: str, *, drop_empty: bool = False) -> None:
        self.root = Path(root)
        self.ann_file, self.image_dir = find_coco_files(self.root, split)
        try:
            self.coco = quiet_coco(self.ann_file)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DatasetError(f"{self.ann_file} is not a COCO instances file: {exc}") from exc
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise DatasetError(f"{self.ann_file} defines no categories")
        self.label_of = {cat: i + 1 for i, cat in enumerate(self.cat_ids)}
        self.classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = sorted(self.coco.imgs)
        if drop_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        if not ids:
            raise DatasetError(f"{self.ann_file} has no usable images")
        self.ids = ids
        self.name = str(_read_meta(self.root).get("name", "COCO-format dataset"))

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int) -> Image.Image:
        info = self.coco.imgs[self.ids[index]]
        path = self.image_dir / info["file_name"]
        try:
            return Image.open(path).convert("RGB")
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc

    def target(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        masks = (
            torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
            if anns
            else torch.zeros((0, height, width), dtype=torch.uint8)
        )
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return {"boxes": boxes[keep], "labels": labels[keep], "masks": masks[keep], "image_id": image_id}

    def __getitem__(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        return self.image(index), self.target(index)


# --------------------------------------------------------------------------------------- semantic (ADE20K)


class SemanticSegmentation(Dataset[tuple[Image.Image, np.ndarray]]):
    """ADE20K-style pairs: images/<split>/X.jpg and annotations/<split>/X.png (one class index per pixel).

    Labels come out as int64 arrays with classes 0..K-1 and IGNORE_INDEX. ADE20K's PNGs use 0 for
    'other' and 1..150 for the classes, so `reduce_zero_label` (mmseg's name) maps 0 -> ignore and k -> k-1;
    it is on by default when the classes come from objectInfo150.csv, and read from meta.json otherwise.
    """

    def __init__(self, root: Path | str, split: str) -> None:
        self.root = Path(root)
        meta = _read_meta(self.root)
        self.image_dir, self.label_dir = self._find_dirs(split)
        self.pairs = self._pairs()
        classes, reduce_zero = self._classes(meta)
        self.classes: list[str] = classes
        self.reduce_zero_label: bool = reduce_zero
        self.ignore_index = int(meta.get("ignore_index", IGNORE_INDEX))
        self.name = str(meta.get("name", "ADE20K-format dataset"))

    def _find_dirs(self, split: str) -> tuple[Path, Path]:
        for name in split_names(split):
            images, labels = self.root / "images" / name, self.root / "annotations" / name
            if images.is_dir() and labels.is_dir():
                return images, labels
        raise DatasetError(
            f"no ADE20K-style split '{split}' under {self.root}: expected images/<split>/ and annotations/<split>/ "
            f"with <split> one of {', '.join(split_names(split))}"
        )

    def _pairs(self) -> list[tuple[Path, Path]]:
        labels = {p.stem: p for p in self.label_dir.glob("*.png")}
        pairs = [
            (p, labels[p.stem])
            for p in sorted(self.image_dir.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in labels
        ]
        if not pairs:
            raise DatasetError(f"no image/label pairs in {self.image_dir} and {self.label_dir}")
        return pairs

    def _classes(self, meta: dict[str, Any]) -> tuple[list[str], bool]:
        if "classes" in meta:
            return [str(c) for c in meta["classes"]], bool(meta.get("reduce_zero_label", False))
        info = self.root / "objectInfo150.csv"
        if info.is_file():
            with open(info, newline="") as handle:
                rows = list(csv.DictReader(handle))
            return [row["Name"].split(";")[0] for row in rows], True
        raise DatasetError(
            f"{self.root}: cannot tell the class names; add meta.json with 'classes' (see evaluator docs)"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.pairs)

    def label(self, index: int) -> np.ndarray:
        path = self.pairs[index][1]
        try:
            raw = np.asarray(Image.open(path), dtype=np.int64)
        except OSError as exc:
            raise DatasetError(f"cannot read label map {path}: {exc}") from exc
        if raw.ndim != 2:
            raise DatasetError(f"{path} is not a single-channel label map (shape {raw.shape})")
        if self.reduce_zero_label:
            raw = np.where(raw == 0, IGNORE_INDEX + 1, raw) - 1  # 0 -> 255, k -> k-1
        raw = np.where(raw == self.ignore_index, IGNORE_INDEX, raw)
        bad = (raw != IGNORE_INDEX) & ((raw < 0) | (raw >= self.num_classes))
        if bad.any():
            raise DatasetError(f"{path} has class indices outside 0..{self.num_classes - 1}: {np.unique(raw[bad])[:5]}")
        return raw

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        path = self.pairs[index][0]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
        label = self.label(index)
        if label.shape != (image.height, image.width):
            raise DatasetError(
                f"{self.pairs[index][1]} is {label.shape}, image {path} is {(image.height, image.width)}"
            )
        return image, label
