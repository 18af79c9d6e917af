"""The tensor (torchvision.io + transforms.v2) multi-crop pipeline against the official PIL one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.config import CropsConfig
from trainer.data.augment import MultiCropAugmentation, TensorMultiCropAugmentation, build_augmentation
from trainer.data.datasets import ImageFolder
from trainer.data.loader import SeededMultiCrop, TensorImageFolder, decode_rgb

CROPS = CropsConfig(global_size=64, local_size=32, local_number=3)
# normalised uint8 range: (0 - mean) / std .. (1 - mean) / std over the ImageNet statistics
LOW, HIGH = (0.0 - 0.485) / 0.229 - 1e-4, (1.0 - 0.406) / 0.225 + 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageNet-layout folder of real-looking JPEGs (a smooth colour gradient with texture)."""
    root = tmp_path_factory.mktemp("jpegs") / "train"
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        h, w = 120 + 10 * i, 160 - 10 * i
        ramp = torch.linspace(0, 255, w).expand(h, w)
        noise = torch.randint(0, 60, (h, w, 3), generator=generator)
        array = (torch.stack([ramp, ramp.flip(1), ramp * 0.5], dim=2) + noise).clamp(0, 255).to(torch.uint8)
        path = root / f"c{i % 2}" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.numpy()).save(path, quality=90)
    return root


def _views(backend: str, image: object) -> list[torch.Tensor]:
    augment = build_augmentation(CROPS, backend)  # type: ignore[arg-type]
    return augment(image)


def test_tensor_views_match_pil_views_in_count_shape_dtype_and_range(folder: Path) -> None:
    path = next(folder.rglob("*.JPEG"))
    pil_image = ImageFolder(folder).loader(str(path))
    tensor_image = decode_rgb(path)
    assert tensor_image.dtype == torch.uint8 and tensor_image.shape == (3, pil_image.height, pil_image.width)
    torch.manual_seed(0)
    pil, tensor = _views("pil", pil_image), _views("tensor", tensor_image)
    assert len(pil) == len(tensor) == CROPS.count
    for a, b in zip(pil, tensor, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        assert float(b.min()) >= LOW and float(b.max()) <= HIGH
        assert float(a.min()) >= LOW and float(a.max()) <= HIGH
    assert [v.shape[-1] for v in tensor] == [64, 64, 32, 32, 32]
    # averaged over many draws, both pipelines give the same per-channel statistics (no channel swap, no double
    # normalisation, jitter and solarisation of the same strength)
    pil_aug, tensor_aug = build_augmentation(CROPS, "pil"), build_augmentation(CROPS, "tensor")
    pil_mean = torch.stack([v.mean((1, 2)) for _ in range(40) for v in pil_aug(pil_image)]).mean(0)
    tensor_mean = torch.stack([v.mean((1, 2)) for _ in range(40) for v in tensor_aug(tensor_image)]).mean(0)
    assert torch.allclose(pil_mean, tensor_mean, atol=0.15), (pil_mean, tensor_mean)


def test_tensor_backend_accepts_pil_images_and_rejects_unknown_backends() -> None:
    grey = Image.new("L", (50, 40), 128)  # Fashion-MNIST gives PIL images; the tensor backend converts them
    views = TensorMultiCropAugmentation(CROPS)(grey)
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert isinstance(build_augmentation(CROPS, "pil"), MultiCropAugmentation)
    with pytest.raises(ValueError, match="backend"):
        build_augmentation(CROPS, "dali")  # type: ignore[arg-type]


def test_tensor_pipeline_is_deterministic_under_the_sample_seed(folder: Path) -> None:
    dataset = SeededMultiCrop(TensorImageFolder(ImageFolder(folder)), build_augmentation(CROPS, "tensor"), seed=7)
    first, label = dataset[(0, 2)]
    again, _ = dataset[(0, 2)]
    other, _ = dataset[(1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))  # another epoch, other crops
    assert label == ImageFolder(folder).samples[2][1]


def test_the_config_picks_the_pipeline_the_training_loader_uses(folder: Path) -> None:
    from trainer.data.loader import build_loader
    from trainer.presets import load_config

    for backend, augmentation in (("pil", MultiCropAugmentation), ("tensor", TensorMultiCropAugmentation)):
        overrides = ["data.dataset=imagefolder", f"data.path={folder}", "data.num_workers=0"]
        cfg = load_config("tiny_cpu", [*overrides, "optim.batch_size_per_gpu=2"])
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment_backend": backend})})
        loader, _ = build_loader(cfg)
        dataset = loader.dataset
        assert isinstance(dataset, SeededMultiCrop) and isinstance(dataset.transform, augmentation), dataset
    tensor = load_config("tiny_cpu", ["data.augment_backend=tensor"])
    assert tensor.config_hash() != load_config("tiny_cpu", []).config_hash()  # the data a run sees changes
