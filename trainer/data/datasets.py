"""Image datasets in standard layouts: ImageFolder (ImageNet) and Fashion-MNIST idx files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from trainer.config import DataConfig

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetError(ValueError):
    """A dataset path that is missing, empty or in the wrong layout."""


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DatasetError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


class FashionMNIST(Dataset[tuple[Image.Image, int]]):
    """Fashion-MNIST from its idx files (as shipped in Debian's dataset-fashion-mnist), as RGB PIL images."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: Path, split: str = "train") -> None:
        root = Path(root)
        images_name, labels_name = FASHION_MNIST_FILES[split]
        found = [root / images_name, root / labels_name]
        missing = [str(p) for p in found if not p.exists() and not p.with_suffix("").exists()]
        if missing:
            raise DatasetError(
                f"Fashion-MNIST {split} files not found: {', '.join(missing)} "
                f"(fetch them with scripts/fetch_data.sh, which unpacks Debian's dataset-fashion-mnist)"
            )
        images_path, labels_path = (p if p.exists() else p.with_suffix("") for p in found)
        self.images = _read_idx(images_path)
        self.targets = _read_idx(labels_path).astype(np.int64)
        if len(self.images) != len(self.targets) or len(self.images) == 0:
            raise DatasetError(f"Fashion-MNIST {split} in {root}: {len(self.images)} images, {len(self.targets)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L").convert("RGB"), int(self.targets[index])


class ImageFolder(datasets.ImageFolder):  # type: ignore[misc]
    """torchvision ImageFolder with errors that say what is wrong with the path."""

    def __init__(self, root: Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist")
        try:
            super().__init__(str(root))
        except FileNotFoundError as exc:
            raise DatasetError(f"image folder {root} has no images in class sub-folders: {exc}") from exc

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return self.loader(path), target


def build_dataset(cfg: DataConfig) -> Dataset[tuple[Image.Image, int]]:
    """The raw (untransformed) dataset of a data config."""
    dataset: Dataset[tuple[Image.Image, int]]
    if cfg.dataset == "fashion_mnist":
        dataset = FashionMNIST(cfg.path, cfg.split)
    else:
        dataset = ImageFolder(cfg.path)
    return dataset
