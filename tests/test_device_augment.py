"""The `device` augmentation backend: colour work per batch on the training device, draws made in the loader.

Each batched operation must equal torchvision's float op on every sample with that sample's parameters, the
loader's draws must follow the official recipe's probabilities and ranges, and a run must train with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import default_collate

from tests.support import micro_overrides
from trainer.config import CropsConfig
from trainer.data import photometric as P
from trainer.data.augment import (
    DeviceMultiCropAugmentation,
    build_augmentation,
    build_device_stage,
    move_views,
)
from trainer.data.datasets import ImageFolder
from trainer.data.loader import SeededMultiCrop, TensorImageFolder, build_loader
from trainer.presets import load_config

CROPS = CropsConfig(global_size=48, local_size=24, local_number=3)
LOW, HIGH = (0.0 - 0.485) / 0.229 - 1e-4, (1.0 - 0.406) / 0.225 + 1e-4
OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _random_params(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Draws with every switch both on and off in the batch, factors spread over their ranges."""
    params = torch.zeros(batch, P.PARAMS)
    params[:, P.JITTER] = torch.arange(batch) % 4 != 3
    params[:, P.ORDER] = torch.stack([torch.randperm(4, generator=generator) for _ in range(batch)]).float()
    low, span = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([0.8, 0.8, 0.4, 0.2])
    params[:, P.FACTORS] = low + span * torch.rand(batch, 4, generator=generator)
    params[:, P.GREY] = torch.arange(batch) % 5 == 1
    sigma = 0.1 + 1.9 * torch.rand(batch, generator=generator)
    params[:, P.SIGMA] = torch.where(torch.arange(batch) % 3 == 0, torch.zeros(batch), sigma)
    params[:, P.SOLARIZE] = torch.arange(batch) % 2 == 0
    return params


def _reference(crop: torch.Tensor, row: torch.Tensor, window: int) -> torch.Tensor:
    """One sample through torchvision's float functional ops in the order its row says."""
    x = crop.float() / 255.0
    if row[P.JITTER] > 0:
        for op_id in row[P.ORDER].long().tolist():
            x = OPS[op_id](x, float(row[P.FACTORS][op_id]))
    if row[P.GREY] > 0:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[P.SIGMA] > 0:
        x = TF.gaussian_blur(x, kernel_size=[2 * window + 1] * 2, sigma=[float(row[P.SIGMA])] * 2)
    if row[P.SOLARIZE] > 0:
        x = TF.solarize(x, threshold=128 / 255)
    return TF.normalize(x, list(P.IMAGENET_MEAN), list(P.IMAGENET_STD))


@pytest.mark.parametrize("size", [40, 7])  # 7: a window wider than the crop is cut to fit the reflection
def test_each_sample_gets_torchvisions_ops_with_its_own_parameters(size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    batch = 24
    crop = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    crop[0] = 77  # a flat sample: hue and saturation of a grey
    params = _random_params(batch, generator)
    stage = P.BatchPhotometric(max_blur_radius=2.0)
    got = stage.view(crop, params)
    assert got.dtype == torch.float32 and got.shape == crop.shape
    window = min(stage.window, size - 1)
    for b in range(batch):
        expected = _reference(crop[b], params[b], window)
        torch.testing.assert_close(got[b], expected, rtol=0, atol=2e-5, msg=f"sample {b}: {params[b].tolist()}")


def test_a_sample_with_nothing_drawn_is_only_normalised() -> None:
    crop = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    params = torch.zeros(2, P.PARAMS)
    params[:, P.ORDER] = torch.arange(4.0)
    params[:, P.FACTORS] = torch.tensor([1.3, 0.7, 1.1, 0.05])  # drawn, but jitter is off
    got = P.BatchPhotometric(2.0).view(crop, params)
    torch.testing.assert_close(got, TF.normalize(crop.float() / 255, list(P.IMAGENET_MEAN), list(P.IMAGENET_STD)))


def test_the_loaders_draws_follow_the_recipe() -> None:
    """Over many views: jitter p 0.8, grey p 0.2, blur p 1.0 / 0.1 / 0.5 and solarisation p 0.2 on the second
    global view only; factors inside the official strengths; every order of the four jitter ops appears."""
    augment = DeviceMultiCropAugmentation(CROPS)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    draws = torch.stack([augment(image).params for _ in range(1500)])  # (N, V, PARAMS)
    n = draws.shape[0]
    rate = lambda column, view: float((draws[:, view, column] > 0).float().mean())  # noqa: E731
    tolerance = 4 * (0.25 / n) ** 0.5  # 4 binomial standard deviations at worst
    for view in range(CROPS.count):
        assert rate(P.JITTER, view) == pytest.approx(0.8, abs=tolerance)
        assert rate(P.GREY, view) == pytest.approx(0.2, abs=tolerance)
    assert rate(P.SIGMA, 0) == 1.0
    assert rate(P.SIGMA, 1) == pytest.approx(0.1, abs=tolerance)
    assert all(rate(P.SIGMA, v) == pytest.approx(0.5, abs=tolerance) for v in range(2, CROPS.count))
    assert rate(P.SOLARIZE, 1) == pytest.approx(0.2, abs=tolerance)
    assert all(rate(P.SOLARIZE, v) == 0.0 for v in (0, *range(2, CROPS.count)))
    sigma = draws[..., P.SIGMA][draws[..., P.SIGMA] > 0]
    assert float(sigma.min()) >= 0.1 and float(sigma.max()) <= 2.0 and float(sigma.max()) > 1.9
    factors = draws[..., P.FACTORS].reshape(-1, 4)
    for op, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert low <= float(factors[:, op].min()) < low + 0.01 and high - 0.01 < float(factors[:, op].max()) <= high
    orders = {tuple(row) for row in draws[..., P.ORDER].reshape(-1, 4).long().tolist()}
    assert len(orders) == 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jpegs") / "train"
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        array = torch.randint(0, 256, (70 + 5 * i, 90, 3), dtype=torch.uint8, generator=generator)
        path = root / f"c{i % 2}" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.numpy()).save(path, quality=90)
    return root


def test_views_after_the_device_stage_match_the_other_backends_in_count_shape_dtype_and_range(folder: Path) -> None:
    dataset = SeededMultiCrop(TensorImageFolder(ImageFolder(folder)), build_augmentation(CROPS, "device"), seed=3)
    samples = [dataset[(0, i)] for i in range(4)]
    views, labels = default_collate(samples)
    assert isinstance(views, P.DeviceViews) and views.params.shape == (4, CROPS.count, P.PARAMS)
    assert all(v.dtype == torch.uint8 for v in views.views)  # a quarter of float32's bytes to copy
    crops = build_device_stage(CROPS, "device")(views, torch.device("cpu"))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 48, 48)] * 2 + [(4, 3, 24, 24)] * 3
    assert all(c.dtype == torch.float32 and float(c.min()) >= LOW and float(c.max()) <= HIGH for c in crops)
    assert labels.tolist() == [ImageFolder(folder).samples[i][1] for i in range(4)]
    again, _ = dataset[(0, 2)]  # a pure function of (seed, epoch, index)
    assert torch.equal(again.params, samples[2][0].params)
    assert all(torch.equal(a, b) for a, b in zip(again.views, samples[2][0].views, strict=True))
    other, _ = dataset[(1, 2)]
    assert not torch.equal(other.params, again.params)
    assert build_device_stage(CROPS, "tensor") is move_views and build_device_stage(CROPS) is move_views
    grey_image = DeviceMultiCropAugmentation(CROPS)(Image.new("L", (50, 40), 128))  # Fashion-MNIST gives PIL
    assert [tuple(v.shape) for v in grey_image.views] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3


def test_device_views_have_the_tensor_backends_colour_statistics() -> None:
    """Per view and channel, over many draws of a colourful image: the same mean and spread as the uint8 v2
    pipeline within 4 standard errors (a channel swap, a double normalisation, or a jitter, grey, blur or
    solarisation of another strength moves them by many)."""
    ramp = torch.linspace(0, 255, 90).expand(70, 90)
    noise = torch.randint(0, 40, (70, 90), generator=torch.Generator().manual_seed(0))
    image = torch.stack([ramp, torch.full_like(ramp, 200.0), 30 + noise]).to(torch.uint8)
    torch.manual_seed(0)
    n = 1000
    tensor_aug, device_aug = build_augmentation(CROPS, "tensor"), build_augmentation(CROPS, "device")
    reference = torch.stack([torch.stack([v.mean((1, 2)) for v in tensor_aug(image)]) for _ in range(n)])
    batch = default_collate([device_aug(image) for _ in range(n)])
    stage = build_device_stage(CROPS, "device")
    got = torch.stack([view.mean((2, 3)) for view in stage(batch, torch.device("cpu"))], dim=1)  # (n, V, 3)
    spread = torch.maximum(reference.std(0), got.std(0))
    assert float(((got.mean(0) - reference.mean(0)).abs() / (spread * (2 / n) ** 0.5)).max()) < 4
    assert float(((got.std(0) - reference.std(0)).abs() / (spread * (1 / n) ** 0.5)).max()) < 4
    assert float((reference.mean(0)[:, 1] - reference.mean(0)[:, 2]).min()) > 1  # the channels differ a lot


@pytest.mark.slow  # a micro training run
def test_the_training_loader_and_a_run_use_the_device_backend(tmp_path: Path) -> None:
    from trainer.train import train

    cfg = load_config("tiny_cpu", micro_overrides(tmp_path, "selfpatch", "data.augment_backend=device"))
    loader, _ = build_loader(cfg)
    assert isinstance(loader.dataset, SeededMultiCrop)
    assert isinstance(loader.dataset.transform, DeviceMultiCropAugmentation)
    assert cfg.config_hash() != load_config("tiny_cpu", micro_overrides(tmp_path, "selfpatch")).config_hash()
    result = train(cfg)
    assert (result.status, result.iteration) == ("completed", 16), result
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
