"""`python -m evaluator`: help, one-line errors with exit code 2 on bad input, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluator.__main__ import main
from tests.conftest import FASHION_MNIST, REPO
from tests.eval_support import composites, micro_checkpoint


def test_help_explains_the_benchmarks() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "evaluator", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for word in ("knn", "linear", "det", "seg", "tiny", "full", "sha256", "exit codes"):
        assert word in done.stdout, word


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00" * 100)
    assert main(["knn", "--checkpoint", str(corrupt), "--data", str(FASHION_MNIST), "--no-cache"]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: checkpoint") and "is corrupt" in line

    checkpoint = str(micro_checkpoint("selfpatch"))
    assert main(["knn", "--checkpoint", checkpoint, "--data", str(tmp_path / "nowhere"), "--no-cache"]) == 2
    assert "does not exist" in _error_line(capsys)
    assert main(["knn", "--checkpoint", checkpoint, "--data", str(FASHION_MNIST), "k=5"]) == 2
    assert "unknown config key 'k'" in _error_line(capsys)
    assert main(["det", "--checkpoint", checkpoint, "--data", str(FASHION_MNIST)]) == 2
    assert "no COCO annotations" in _error_line(capsys)
    assert main(["seg", "--checkpoint", checkpoint, "--data", str(composites()), "--config", "huge"]) == 2
    assert "no config named 'huge'" in _error_line(capsys)
    assert main(["knn", "--data", str(FASHION_MNIST)]) == 2
    assert "--checkpoint is required" in _error_line(capsys)


def test_json_output_holds_the_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "knn",
        "--baseline",
        "pixels",
        "--data",
        str(FASHION_MNIST),
        "--cache-dir",
        str(tmp_path),
        "--output",
        "json",
    ]
    assert main([*argv, "max_train_samples=200", "max_test_samples=50", "ks=[10,20]"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["benchmark"] == "knn" and record["baseline"] == "pixels"
    assert set(record["metrics"]) >= {"knn/top1_k10", "knn/top1_k20", "knn/top5_k20"}
    assert record["metrics"]["knn/top1_k20"] > 30.0  # raw pixels are far above chance (10 %) on Fashion-MNIST
    assert main(["linear", "--dump-config", "--data", "x", "--config", "full"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 100
