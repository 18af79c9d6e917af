"""DINO's multi-crop augmentation (spec 1.3) with configurable crop sizes, counts and scales.

Two builders of the same recipe: `pil` (the official code's PIL pipeline, the default) and `tensor`
(torchvision.transforms.v2 on uint8 CHW tensors, for images decoded by torchvision.io.decode_jpeg). Both give
2 global + N local float32 crops normalised with the ImageNet statistics; their random draws differ, so the
same seed gives different (equally distributed) crops in the two backends.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Literal

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from trainer.config import AugmentBackend, CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                ),
                transforms.RandomGrayscale(p=0.2),
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
                blur(1.0),
                normalize,
            ]
        )
        self.global_transfo2 = transforms.Compose(
            [
                crop(crops.global_size, crops.global_scale),
                flip_and_color_jitter,
                blur(0.1),
                Solarization(0.2),
                normalize,
            ]
        )
        self.local_crops_number = crops.local_number
        self.local_transfo = transforms.Compose(
            [
                crop(crops.local_size, crops.local_scale),
                flip_and_color_jitter,
                blur(0.5),
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


class TensorMultiCropAugmentation:
    """The recipe of MultiCropAugmentation on uint8 (3, H, W) tensors with torchvision.transforms.v2.

    Crop, flip, colour jitter, grey-scale, solarisation (values >= 128 inverted, as PIL does) and
    normalisation run on tensors; the blur is the official PIL blur (radius ~ U[low, high], the same
    Python-random draws) applied to the uint8 crop. PIL images (Fashion-MNIST) are converted to tensors first.
    """

    def __init__(self, crops: CropsConfig) -> None:
        from torchvision.transforms import v2

        bicubic = v2.InterpolationMode.BICUBIC
        low, high = crops.blur_radius

        def blur(p: float) -> PilOnTensor:
            return PilOnTensor(GaussianBlur(p, low, high))

        def view(size: int, scale: tuple[float, float], *extra: Callable[[torch.Tensor], torch.Tensor]) -> v2.Compose:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
                    v2.RandomHorizontalFlip(p=0.5),
                    v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                    v2.RandomGrayscale(p=0.2),
                    *extra,
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                ]
            )

        self.global_transfo1 = view(crops.global_size, crops.global_scale, blur(1.0))
        self.global_transfo2 = view(
            crops.global_size, crops.global_scale, blur(0.1), v2.RandomSolarize(threshold=128, p=0.2)
        )
        self.local_crops_number = crops.local_number
        self.local_transfo = view(crops.local_size, crops.local_scale, blur(0.5))

    def __call__(self, image: torch.Tensor | Image.Image) -> list[torch.Tensor]:
        if isinstance(image, Image.Image):
            from torchvision.transforms.v2.functional import pil_to_tensor

            image = pil_to_tensor(image.convert("RGB"))
        views: list[torch.Tensor] = [self.global_transfo1(image), self.global_transfo2(image)]
        views += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return views


def build_augmentation(crops: CropsConfig, backend: Backend = "pil") -> Callable[[Any], list[torch.Tensor]]:
    """The multi-crop augmentation of a backend: 'pil' (official) or 'tensor' (v2 on uint8 tensors)."""
    if backend == "pil":
        return MultiCropAugmentation(crops)
    if backend == "tensor":
        return TensorMultiCropAugmentation(crops)
    raise ValueError(f"unknown augmentation backend {backend!r}; choose 'pil' or 'tensor'")
