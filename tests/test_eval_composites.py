"""The synthetic-composites generator: deterministic, split-disjoint, consistent labels, honest naming."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from evaluator.composites import CLASSES, NAME, find_stamps, generate, split_sources
from evaluator.datasets import CocoInstances, SemanticSegmentation
from tests.eval_support import COMPOSITE_SOURCES, composites


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    counts = {"train": 4, "val": 2}
    generate(COMPOSITE_SOURCES, tmp_path / "a", counts, size=64, seed=3)
    generate(COMPOSITE_SOURCES, tmp_path / "b", counts, size=64, seed=3)
    generate(COMPOSITE_SOURCES, tmp_path / "c", counts, size=64, seed=4)
    a, b, c = (_digests(tmp_path / x) for x in "abc")
    assert len(a) == 1 + 2 * 6 + 2  # meta, an image and a label map per image, one COCO file per split
    assert a == b
    images = [k for k in a if k.startswith("images/")]
    assert all(a[k] != c[k] for k in images)


def test_train_and_val_share_no_cutout_and_no_background() -> None:
    stamps = find_stamps(COMPOSITE_SOURCES)
    splits = split_sources(stamps)
    groups = {s: {st.group for st in splits[s]["stamps"]} for s in splits}
    assert not groups["train"] & groups["val"]  # mirrored variants count as one cut-out
    assert not set(splits["train"]["backgrounds"]) & set(splits["val"]["backgrounds"])
    for label in range(1, len(CLASSES) + 1):  # stratified: every class in both splits
        assert any(s.label == label for s in splits["val"]["stamps"]), CLASSES[label - 1]
        assert any(s.label == label for s in splits["train"]["stamps"]), CLASSES[label - 1]

    root = composites(8, 4)
    used: dict[str, tuple[set[str], set[str]]] = {}
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        used[split] = ({a["cutout"] for a in coco["annotations"]}, {i["background"] for i in coco["images"]})
    assert used["train"][0] and used["val"][0]
    assert not used["train"][0] & used["val"][0]
    assert not used["train"][1] & used["val"][1]
    meta = json.loads((root / "meta.json").read_text())
    assert not set(meta["splits"]["train"]["cutouts"]) & set(meta["splits"]["val"]["cutouts"])
    assert used["val"][0] <= set(meta["splits"]["val"]["cutouts"])


def test_semantic_maps_agree_with_the_coco_instances() -> None:
    root = composites(8, 4)
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert coco["annotations"], split
        for image in coco["images"]:
            label = np.asarray(Image.open(root / "annotations" / split / image["file_name"].replace(".jpg", ".png")))
            assert set(np.unique(label)) <= {0, 255, *range(1, len(CLASSES) + 1)}
            covered = np.zeros_like(label, dtype=bool)
            for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
                mask = mask_utils.decode(ann["segmentation"]).astype(bool)
                assert (label[mask] == ann["category_id"]).all()
                assert mask.sum() >= 64 and ann["area"] == mask.sum()
                assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(ann["segmentation"])]
                assert not (covered & mask).any()  # z-order: visible masks never overlap
                covered |= mask
            objects = (label != 0) & (label != 255)
            assert (objects == covered).all()  # every labelled object pixel belongs to a kept instance


def test_named_synthetic_composites_and_read_by_the_standard_loaders() -> None:
    root = composites(8, 4)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["name"] == NAME == "synthetic composites"
    assert "not COCO" in meta["description"]
    assert meta["classes"] == ["background", *CLASSES]
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert coco["info"]["description"].startswith("synthetic composites")
    assert len(meta["sources"]) == 4 and meta["sources"][0].startswith("tuxpaint-stamps-default ")

    det = CocoInstances(root, "val")
    assert det.classes == list(CLASSES) and det.name == "synthetic composites"
    image, target = det[0]
    assert image.size == (96, 96) and target["masks"].shape[1:] == (96, 96)
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
    seg = SemanticSegmentation(root, "val")
    assert seg.classes[0] == "background" and seg.num_classes == 9 and not seg.reduce_zero_label
    image, label = seg[0]
    assert label.shape == (96, 96) and label.dtype == np.int64
