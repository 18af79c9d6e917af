"""DINO's multi-crop augmentation (spec 1.3) with configurable crop sizes, counts and scales.

Three builders of the same recipe: `pil` (the official code's PIL pipeline, the default), `tensor`
(torchvision.transforms.v2 on uint8 CHW tensors, for images decoded by torchvision.io.decode_jpeg) and `device`
(the loader crops and flips uint8 tensors and draws the colour parameters; the training process applies them
to whole batches on its device, `trainer.data.photometric`). All give 2 global + N local float32 crops
normalised with the ImageNet statistics once `build_device_stage`'s function has run in the training process;
their random draws differ, so the same seed gives different (equally distributed) crops in each backend.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Literal

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from trainer.config import AugmentBackend, CropsConfig
from trainer.data.photometric import (
    FACTORS,
    GREY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    ORDER,
    PARAMS,
    SIGMA,
    SOLARIZE,
    BatchPhotometric,
    DeviceViews,
)

#: ColorJitter strengths (brightness, contrast, saturation, hue) and the probabilities of jitter and grey-scale.
JITTER_STRENGTH, JITTER_P, GREY_P = (0.4, 0.4, 0.2, 0.1), 0.8, 0.2
#: (blur probability, solarisation probability) of the first global view, the second and every local one.
GLOBAL1, GLOBAL2, LOCAL = (1.0, 0.0), (0.1, 0.2), (0.5, 0.0)


class GaussianBlur:
    """PIL Gaussian blur with radius ~ U[radius_min, radius_max], applied with probability p."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """PIL solarize (threshold 128) with probability p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class MultiCropAugmentation:
    """2 global crops (blur p=1.0 / p=0.1 + solarize p=0.2) and N local crops (blur p=0.5)."""

    def __init__(self, crops: CropsConfig) -> None:
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply(
                    [transforms.ColorJitter(*JITTER_STRENGTH)], p=JITTER_P
                ),
                transforms.RandomGrayscale(p=GREY_P),
            ]
        )
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = transforms.InterpolationMode.BICUBIC

        low, high = crops.blur_radius

        def blur(p: float) -> GaussianBlur:
            return GaussianBlur(p, low, high)

        def crop(size: int, scale: tuple[float, float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(size, scale=scale, interpolation=bicubic)

        self.global_transfo1 = transforms.Compose(
            [
                crop(crops.global_size, crops.global_scale),
                flip_and_color_jitter,
                blur(GLOBAL1[0]),
                normalize,
            ]
        )
        self.global_transfo2 = transforms.Compose(
            [
                crop(crops.global_size, crops.global_scale),
                flip_and_color_jitter,
                blur(GLOBAL2[0]),
                Solarization(GLOBAL2[1]),
                normalize,
            ]
        )
        self.local_crops_number = crops.local_number
        self.local_transfo = transforms.Compose(
            [
                crop(crops.local_size, crops.local_scale),
                flip_and_color_jitter,
                blur(LOCAL[0]),
                normalize,
            ]
        )

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        views = [self.global_transfo1(image), self.global_transfo2(image)]
        views += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return views


Backend = AugmentBackend  # the config's names for the pipelines built here


class PilOnTensor:
    """Applies a PIL-image transform to a uint8 (3, H, W) tensor (the round trip is a copy, about 1 ms at 224 px).

    Used for the Gaussian blur: PIL's extended-box blur is the official operation and, at these radii,
    several times faster on a CPU core than v2.GaussianBlur's float convolution.
    """

    def __init__(self, transform: Callable[[Image.Image], Image.Image]) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import numpy as np

        out = self.transform(Image.fromarray(image.permute(1, 2, 0).numpy()))
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def as_uint8(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """A uint8 (3, H, W) RGB tensor; PIL images (Fashion-MNIST gives them) are converted."""
    if isinstance(image, Image.Image):
        from torchvision.transforms.v2.functional import pil_to_tensor

        converted: torch.Tensor = pil_to_tensor(image.convert("RGB"))
        return converted
    return image


def uint8_geometry(size: int, scale: tuple[float, float]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The recipe's RandomResizedCrop (bicubic, antialiased) and flip, as v2 transforms on uint8 tensors."""
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return [crop, v2.RandomHorizontalFlip(p=0.5)]


class TensorMultiCropAugmentation:
    """The recipe of MultiCropAugmentation on uint8 (3, H, W) tensors with torchvision.transforms.v2.

    Crop, flip, colour jitter, grey-scale, solarisation (values >= 128 inverted, as PIL does) and
    normalisation run on tensors; the blur is the official PIL blur (radius ~ U[low, high], the same
    Python-random draws) applied to the uint8 crop. PIL images (Fashion-MNIST) are converted to tensors first.
    """

    def __init__(self, crops: CropsConfig) -> None:
        from torchvision.transforms import v2

        low, high = crops.blur_radius

        def blur(p: float) -> PilOnTensor:
            return PilOnTensor(GaussianBlur(p, low, high))

        def view(size: int, scale: tuple[float, float], *extra: Callable[[torch.Tensor], torch.Tensor]) -> v2.Compose:
            return v2.Compose(
                [
                    *uint8_geometry(size, scale),
                    v2.RandomApply([v2.ColorJitter(*JITTER_STRENGTH)], p=JITTER_P),
                    v2.RandomGrayscale(p=GREY_P),
                    *extra,
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                ]
            )

        self.global_transfo1 = view(crops.global_size, crops.global_scale, blur(GLOBAL1[0]))
        self.global_transfo2 = view(
            crops.global_size, crops.global_scale, blur(GLOBAL2[0]), v2.RandomSolarize(threshold=128, p=GLOBAL2[1])
        )
        self.local_crops_number = crops.local_number
        self.local_transfo = view(crops.local_size, crops.local_scale, blur(LOCAL[0]))

    def __call__(self, image: torch.Tensor | Image.Image) -> list[torch.Tensor]:
        image = as_uint8(image)
        views: list[torch.Tensor] = [self.global_transfo1(image), self.global_transfo2(image)]
        views += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return views


class DeviceMultiCropAugmentation:
    """The loader's half of the `device` backend: each view cropped, resized and flipped as uint8 (v2), and the
    draws of its colour half (applied per batch by `BatchPhotometric`) as one parameter row per view.

    The draws follow MultiCropAugmentation: jitter with p 0.8 (its four operations in a random order, factors
    uniform within the strengths), grey-scale p 0.2, blur radius ~ U[crops.blur_radius] with p 1.0 / 0.1 / 0.5
    (first global / second global / local views), solarisation p 0.2 on the second global view only.
    """

    def __init__(self, crops: CropsConfig) -> None:
        from torchvision.transforms import v2

        def geometry(size: int, scale: tuple[float, float]) -> v2.Compose:
            return v2.Compose(uint8_geometry(size, scale))

        first, second = geometry(crops.global_size, crops.global_scale), geometry(crops.global_size, crops.global_scale)
        local = geometry(crops.local_size, crops.local_scale)
        self.views = [(first, *GLOBAL1), (second, *GLOBAL2)] + [(local, *LOCAL)] * crops.local_number
        self.blur_radius = crops.blur_radius
        strengths = torch.tensor(JITTER_STRENGTH)
        centre = torch.tensor([1.0, 1.0, 1.0, 0.0])  # hue shifts around 0, the others scale around 1
        self.factor_low, self.factor_span = centre - strengths, 2 * strengths

    def __call__(self, image: torch.Tensor | Image.Image) -> DeviceViews:
        image = as_uint8(image)
        crops = [transform(image) for transform, _, _ in self.views]
        params = torch.stack([self.draw(blur_p, solarize_p) for _, blur_p, solarize_p in self.views])
        return DeviceViews(crops, params)

    def draw(self, blur_p: float, solarize_p: float) -> torch.Tensor:
        """One view's colour parameters (torch's RNG, so the per-sample seed fixes them)."""
        row = torch.zeros(PARAMS)
        coins = torch.rand(4)
        row[JITTER] = float(coins[0] < JITTER_P)
        row[ORDER] = torch.randperm(4).float()
        row[FACTORS] = self.factor_low + self.factor_span * torch.rand(4)
        row[GREY] = float(coins[1] < GREY_P)
        low, high = self.blur_radius
        row[SIGMA] = float(low + (high - low) * torch.rand(())) if coins[2] < blur_p else 0.0
        row[SOLARIZE] = float(coins[3] < solarize_p)
        return row


def build_augmentation(crops: CropsConfig, backend: Backend = "pil") -> Callable[[Any], Any]:
    """The loader's multi-crop augmentation of a backend: 'pil' (official), 'tensor' (v2 on uint8 tensors) or
    'device' (geometry here, colour per batch on the training device)."""
    if backend == "pil":
        return MultiCropAugmentation(crops)
    if backend == "tensor":
        return TensorMultiCropAugmentation(crops)
    if backend == "device":
        return DeviceMultiCropAugmentation(crops)
    raise ValueError(f"unknown augmentation backend {backend!r}; choose 'pil', 'tensor' or 'device'")


def move_views(views: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [view.to(device, non_blocking=True) for view in views]


def build_device_stage(crops: CropsConfig, backend: Backend = "pil") -> Callable[[Any, torch.device], list[torch.Tensor]]:
    """What the training process does with a collated batch of views: move it to the device, and for the
    'device' backend run the recipe's colour half there."""
    if backend == "device":
        return BatchPhotometric(crops.blur_radius[1])
    return move_views
