"""Metric code against ground truth, literal references and hand-computed numbers (no model involved)."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from evaluator.datasets import quiet_coco
from evaluator.detection import coco_metrics, to_coco_results
from evaluator.features import FeatureSet
from evaluator.knn import knn_classify
from evaluator.linear import cached_batches, train_linear
from evaluator.segmentation import confusion_matrix, segmentation_metrics
from tests.eval_support import clusters

# ------------------------------------------------------------------------------------------------ COCO


def _coco_gt(seed: int = 0, images: int = 6, size: int = 200) -> tuple[object, dict]:
    """A COCO ground truth of rectangles and discs of 3 categories and all three area ranges."""
    rng = np.random.default_rng(seed)
    dataset: dict = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"cat {c}"} for c in (1, 2, 7)]}
    for image_id in range(1, images + 1):
        dataset["images"].append({"id": image_id, "width": size, "height": size, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(2, 6))):
            side = int(rng.choice([20, 60, 120]))  # small (<32^2), medium, large
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            canvas = np.zeros((size, size), dtype=np.uint8)
            if rng.random() < 0.5:
                canvas[y : y + side, x : x + side] = 1
            else:
                yy, xx = np.mgrid[:size, :size]
                canvas[(yy - y - side / 2) ** 2 + (xx - x - side / 2) ** 2 <= (side / 2) ** 2] = 1
            rle = mask_utils.encode(np.asfortranarray(canvas))
            rle["counts"] = rle["counts"].decode("ascii")
            dataset["annotations"].append(
                {
                    "id": len(dataset["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice([1, 2, 7])),
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    coco = quiet_coco()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, dataset


def _as_results(dataset: dict, with_masks: bool) -> list[dict]:
    out = []
    for ann in dataset["annotations"]:
        entry = {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "score": 1.0,
            "bbox": list(ann["bbox"]),
        }
        if with_masks:
            entry["segmentation"] = copy.deepcopy(ann["segmentation"])
        out.append(entry)
    return out


def test_ground_truth_as_predictions_scores_ap_one() -> None:
    coco, dataset = _coco_gt()
    for iou_type in ("bbox", "segm"):
        metrics = coco_metrics(coco, _as_results(dataset, iou_type == "segm"), iou_type)
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert metrics[name] == pytest.approx(100.0), (iou_type, name, metrics[name])
        per_class = {k: v for k, v in metrics.items() if k.startswith("AP_")}
        assert set(per_class) == {"AP_cat_1", "AP_cat_2", "AP_cat_7"}
        assert all(v == pytest.approx(100.0) for v in per_class.values())


def test_jittered_boxes_score_exactly_what_pycocotools_computes() -> None:
    coco, dataset = _coco_gt(seed=1)
    rng = np.random.default_rng(5)
    results = []
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0.0, 0.08, 4) * np.array([w, h, w, h])
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "score": float(rng.uniform(0.1, 1.0)),
                "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
            }
        )
    ours = coco_metrics(coco, copy.deepcopy(results), "bbox")

    with contextlib.redirect_stdout(io.StringIO()):
        direct = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    for i, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert ours[name] == 100.0 * direct.stats[i]
    assert 5.0 < ours["AP"] < 95.0  # the jitter really moved the boxes
    assert ours["AP50"] > ours["AP75"]
    precision = direct.eval["precision"][:, :, 1, 0, -1]  # category id 2 is the second one
    assert ours["AP_cat_2"] == pytest.approx(100.0 * precision[precision > -1].mean())


def test_no_detections_score_zero_and_undefined_ranges_are_left_out() -> None:
    coco, dataset = _coco_gt(seed=2)
    metrics = coco_metrics(coco, [], "bbox")
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0
    only_large = copy.deepcopy(dataset)
    only_large["annotations"] = [a for a in only_large["annotations"] if a["area"] > 96**2]
    coco_large = quiet_coco()
    coco_large.dataset = only_large
    with contextlib.redirect_stdout(io.StringIO()):
        coco_large.createIndex()
    metrics = coco_metrics(coco_large, _as_results(only_large, False), "bbox")
    assert "APs" not in metrics and "APm" not in metrics  # COCOeval's -1: no ground truth there
    assert metrics["APl"] == pytest.approx(100.0)


def test_model_outputs_convert_to_coco_results_that_score_like_the_truth() -> None:
    coco, dataset = _coco_gt(seed=3, images=2)
    cat_ids = [1, 2, 7]
    bbox, segm = [], []
    for image_id in (1, 2):
        anns = [a for a in dataset["annotations"] if a["image_id"] == image_id]
        masks = np.stack([mask_utils.decode(a["segmentation"]) for a in anns])
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        )
        output = {
            "boxes": boxes,
            "scores": torch.linspace(0.9, 0.5, len(anns)),
            "labels": torch.tensor([cat_ids.index(a["category_id"]) + 1 for a in anns]),
            "masks": torch.from_numpy(masks).float()[:, None] * 0.9,  # probabilities above the 0.5 threshold
        }
        b, s = to_coco_results(output, image_id, cat_ids)
        bbox += b
        segm += s
    assert coco_metrics(coco, bbox, "bbox", image_ids=[1, 2])["AP"] == pytest.approx(100.0)
    assert coco_metrics(coco, segm, "segm", image_ids=[1, 2])["AP"] == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------- mIoU


def test_miou_equals_a_hand_computed_confusion_matrix() -> None:
    # 4 classes, class 3 appears nowhere (left out of the means); 255 is ignored
    label = torch.tensor([[0, 0, 1, 1, 255], [0, 2, 2, 1, 255], [2, 2, 2, 0, 1]])
    pred = torch.tensor([[0, 1, 1, 1, 3], [0, 2, 0, 1, 0], [2, 2, 1, 0, 1]])
    cm = confusion_matrix(pred, label, num_classes=4)
    expected = torch.tensor(
        [
            # predicted: 0  1  2  3      ground truth
            [3, 1, 0, 0],  # 0: (0,0) (0,1)->1 (1,0) (2,3)
            [0, 4, 0, 0],  # 1: (0,2) (0,3) (1,3) (2,4)
            [1, 1, 3, 0],  # 2: (1,1) (1,2)->0 (2,0) (2,1) (2,2)->1
            [0, 0, 0, 0],
        ]
    )
    assert torch.equal(cm, expected)
    metrics = segmentation_metrics(cm, ["bg", "a", "b", "never"])
    iou = [3 / (4 + 4 - 3), 4 / (4 + 6 - 4), 3 / (5 + 3 - 3)]  # TP / (GT + pred - TP)
    acc = [3 / 4, 4 / 4, 3 / 5]
    assert metrics["IoU_bg"] == pytest.approx(100 * iou[0])
    assert metrics["IoU_a"] == pytest.approx(100 * iou[1])
    assert metrics["IoU_b"] == pytest.approx(100 * iou[2])
    assert "IoU_never" not in metrics
    assert metrics["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert metrics["mAcc"] == pytest.approx(100 * sum(acc) / 3)
    assert metrics["aAcc"] == pytest.approx(100 * 10 / 13)


def test_miou_counts_a_class_that_is_predicted_but_absent() -> None:
    label = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    metrics = segmentation_metrics(confusion_matrix(pred, label, 3), ["x", "y", "z"])
    assert metrics["IoU_z"] == 0.0  # union 1, intersection 0: a real zero, not undefined
    assert metrics["mIoU"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)


# ---------------------------------------------------------------------------------------------- k-NN


def test_knn_on_separable_features_is_perfect() -> None:
    train = clusters(50, 5, 16, 0.5, seed=0)
    test = clusters(20, 5, 16, 0.5, seed=1)
    results = knn_classify(train, test, ks=(10, 20, 100, 200), num_classes=5)
    assert [r.k for r in results] == [10, 20, 100, 200]
    assert all(r.top1 == 100.0 and r.top5 == 100.0 for r in results)


def test_knn_vote_is_weighted_by_exp_similarity_over_temperature() -> None:
    # query [1, 0]: one class-1 neighbour at cosine 1.0, two class-0 neighbours at cosine 0.8
    train = FeatureSet(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]]), torch.tensor([1, 0, 0]))
    test = FeatureSet(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    (weighted,) = knn_classify(train, test, ks=(3,), temperature=0.07)
    assert weighted.top1 == 100.0  # exp(1/0.07) > 2 exp(0.8/0.07)
    (flat,) = knn_classify(train, test, ks=(3,), temperature=100.0)
    assert flat.top1 == 0.0  # nearly equal weights: the majority (class 0) wins


def _dino_knn(train_f, train_l, test_f, test_l, k, T, num_classes):  # type: ignore[no-untyped-def]  # noqa: N803
    """DINO's eval_knn.knn_classifier, verbatim apart from the chunk size."""
    top1, top5, total = 0.0, 0.0, 0
    train_f = train_f.t()
    num_test_images, imgs_per_chunk = test_l.shape[0], 7
    retrieval_one_hot = torch.zeros(k, num_classes)
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_f[idx : min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_l[idx : min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_f)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_l.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(
            torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes), distances_transform.view(batch_size, -1, 1)),
            1,
        )
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
    return top1 * 100.0 / total, top5 * 100.0 / total


def test_knn_matches_dinos_reference_implementation() -> None:
    generator = torch.Generator().manual_seed(3)
    train = FeatureSet(torch.randn(300, 12, generator=generator), torch.randint(0, 10, (300,), generator=generator))
    test = FeatureSet(torch.randn(50, 12, generator=generator), torch.randint(0, 10, (50,), generator=generator))
    ours = knn_classify(train, test, ks=(10, 20, 100, 200), num_classes=10, chunk=16)
    normed_train = torch.nn.functional.normalize(train.features, dim=1)
    normed_test = torch.nn.functional.normalize(test.features, dim=1)
    for result in ours:
        top1, top5 = _dino_knn(normed_train, train.labels, normed_test, test.labels, result.k, 0.07, 10)
        assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5), result.k
    assert not all(math.isclose(r.top1, 100.0) for r in ours)  # random data: the check is not trivial


# -------------------------------------------------------------------------------------------- linear


def test_linear_probe_separates_separable_features_and_scales_lr() -> None:
    train = clusters(40, 4, 8, 0.3, seed=0)
    test = clusters(10, 4, 8, 0.3, seed=1)
    generator = torch.Generator().manual_seed(0)
    result = train_linear(
        lambda epoch: cached_batches(train, 32, generator),
        test,
        dim=8,
        num_classes=4,
        epochs=20,
        batch_size=32,
        base_lr=0.1,
    )
    assert result["top1"] == 100.0 and result["top1_best"] == 100.0
    assert result["lr"] == pytest.approx(0.1 * 32 / 256)
