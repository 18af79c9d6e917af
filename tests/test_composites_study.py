"""The composites study set: deterministic, read by the trainer, and pretraining never sees a probe image."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from evaluator.composites import (
    DISJOINTNESS,
    PRETRAIN,
    DisjointnessError,
    _check_content_disjoint,
    find_stamps,
    generate,
    main,
    study,
)
from evaluator.datasets import CocoInstances, SemanticSegmentation
from tests.eval_support import COMPOSITE_SOURCES
from trainer.config import DataConfig
from trainer.data.datasets import build_dataset
from trainer.data.loader import build_loader
from trainer.presets import load_config

COUNTS = {"pretrain": 8, "train": 4, "val": 3}
SIZE = 64


def _study(out: Path, seed: int = 0) -> None:
    study(COMPOSITE_SOURCES, out, pretrain=8, train=4, val=3, size=SIZE, seed=seed)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def study_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study") / "set"
    _study(root)
    return root


def test_same_seed_gives_identical_files_and_another_seed_does_not(study_root: Path, tmp_path: Path) -> None:
    _study(tmp_path / "same")
    _study(tmp_path / "other", seed=1)
    a, b, c = _digests(study_root), _digests(tmp_path / "same"), _digests(tmp_path / "other")
    # meta, provenance, per probe image a JPEG and a label map, one COCO file per probe split
    assert len(a) == 2 + 8 + 2 * (4 + 3) + 2
    assert a == b
    images = [k for k in a if k.endswith(".jpg")]
    assert len(images) == 8 + 4 + 3
    assert all(a[k] != c[k] for k in images)


def test_probe_splits_are_what_generate_writes_for_them(study_root: Path, tmp_path: Path) -> None:
    generate(COMPOSITE_SOURCES, tmp_path, {"train": 4, "val": 3}, size=SIZE, seed=0)
    probe, full = _digests(tmp_path), _digests(study_root)
    assert {k: v for k, v in full.items() if k.startswith(("images/", "annotations/"))} == {
        k: v for k, v in probe.items() if k != "meta.json"
    }


def test_the_trainer_reads_the_pretrain_image_folder(study_root: Path, tmp_path: Path) -> None:
    dataset = build_dataset(DataConfig(dataset="imagefolder", path=study_root / PRETRAIN))
    assert len(dataset) == COUNTS["pretrain"]  # type: ignore[arg-type]
    assert dataset.classes == ["unlabeled"]  # type: ignore[attr-defined]
    image, label = dataset[0]
    assert image.mode == "RGB" and image.size == (SIZE, SIZE) and label == 0

    cfg = load_config(
        "tiny_cpu",
        [
            "data.dataset=imagefolder",
            f"data.path={study_root / PRETRAIN}",
            "data.num_workers=0",
            "optim.batch_size_per_gpu=4",
            f"checkpoint.output_dir={tmp_path}",
        ],
    )
    loader, sampler = build_loader(cfg)
    assert len(sampler) == COUNTS["pretrain"] // 4
    views, _ = next(iter(loader))
    assert views[0].shape == (4, 3, cfg.crops.global_size, cfg.crops.global_size)
    assert torch.isfinite(views[0]).all()


def test_no_pretrain_image_is_a_probe_image(study_root: Path) -> None:
    pretrain = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (study_root / PRETRAIN).rglob("*.jpg")}
    probe = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (study_root / "images").rglob("*.jpg")}
    assert len(pretrain) == COUNTS["pretrain"] and len(probe) == COUNTS["train"] + COUNTS["val"]
    assert not pretrain & probe


def test_val_shares_no_source_with_pretrain_or_probe_train(study_root: Path) -> None:
    group = {s.path: s.group for s in find_stamps(COMPOSITE_SOURCES)}  # mirrored variants are one cut-out
    meta = json.loads((study_root / "meta.json").read_text())
    pools = {k: (set(v["cutouts"]), set(v["backgrounds"])) for k, v in meta["splits"].items()}
    assert pools[PRETRAIN] == pools["train"]  # the documented rule: pretrain draws on probe-train sources
    assert not {group[c] for c in pools["val"][0]} & {group[c] for c in pools["train"][0]}
    assert not pools["val"][1] & pools["train"][1]

    provenance = json.loads((study_root / PRETRAIN / "provenance.json").read_text())
    pretrain_cutouts = {c for r in provenance["images"] for c in r["cutouts"]}
    pretrain_backgrounds = {r["background"] for r in provenance["images"]}
    coco = json.loads((study_root / "annotations" / "instances_val.json").read_text())
    val_cutouts = {a["cutout"] for a in coco["annotations"]}
    val_backgrounds = {i["background"] for i in coco["images"]}
    assert pretrain_cutouts and val_cutouts
    assert pretrain_cutouts <= pools["train"][0] and pretrain_backgrounds <= pools["train"][1]
    assert not {group[c] for c in pretrain_cutouts} & {group[c] for c in val_cutouts}
    assert not pretrain_backgrounds & val_backgrounds


def test_meta_lists_every_split_with_its_count(study_root: Path) -> None:
    meta = json.loads((study_root / "meta.json").read_text())
    assert {k: v["images"] for k, v in meta["splits"].items()} == COUNTS
    assert meta["splits"][PRETRAIN]["folder"] == "pretrain/unlabeled"
    assert meta["splits"][PRETRAIN]["labels"] is None and meta["splits"][PRETRAIN]["sources_from"] == "train"
    assert meta["disjointness"] == DISJOINTNESS
    assert meta["name"] == "synthetic composites" and "not COCO" in meta["description"]
    assert len(SemanticSegmentation(study_root, "val")) == COUNTS["val"]  # the probes' loaders read the root
    assert len(CocoInstances(study_root, "train")) == COUNTS["train"]


def test_a_probe_image_copied_into_pretrain_is_refused(study_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(study_root, root)
    provenance = json.loads((root / PRETRAIN / "provenance.json").read_text())
    probe = (root / "images" / "val" / "000000.jpg").read_bytes()
    provenance["images"][0]["sha256"] = hashlib.sha256(probe).hexdigest()
    (root / PRETRAIN / "provenance.json").write_text(json.dumps(provenance))
    with pytest.raises(DisjointnessError, match="equals probe image"):
        _check_content_disjoint(root, {"train": COUNTS["train"], "val": COUNTS["val"]})


def test_cli_study_rerun_with_fewer_images_leaves_no_strays(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    common = ["study", "--sources", str(COMPOSITE_SOURCES), "--out", str(out), "--size", "32"]
    assert main([*common, "--pretrain", "5", "--train", "3", "--val", "2"]) == 0
    assert main([*common, "--pretrain", "2", "--train", "1", "--val", "1"]) == 0
    assert len(build_dataset(DataConfig(dataset="imagefolder", path=out / PRETRAIN))) == 2  # type: ignore[arg-type]
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == ["000000.jpg"]
    assert sorted(p.name for p in (out / "annotations" / "val").iterdir()) == ["000000.png"]
    assert main([*common, "--pretrain", "-1"]) == 2


def test_unknown_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        generate(COMPOSITE_SOURCES, tmp_path, {"test": 1}, size=SIZE)
