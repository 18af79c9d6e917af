"""DINO's multi-crop augmentation (spec 1.3) with configurable crop sizes, counts and scales."""

from __future__ import annotations

import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from trainer.config import CropsConfig

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
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
            ),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = transforms.InterpolationMode.BICUBIC

        low, high = crops.blur_radius

        def blur(p: float) -> GaussianBlur:
            return GaussianBlur(p, low, high)

        def crop(size: int, scale: tuple[float, float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(size, scale=scale, interpolation=bicubic)

        self.global_transfo1 = transforms.Compose([
            crop(crops.global_size, crops.global_scale), flip_and_color_jitter, blur(1.0), normalize,
        ])
        self.global_transfo2 = transforms.Compose([
            crop(crops.global_size, crops.global_scale), flip_and_color_jitter, blur(0.1),
            Solarization(0.2), normalize,
        ])
        self.local_crops_number = crops.local_number
        self.local_transfo = transforms.Compose([
            crop(crops.local_size, crops.local_scale), flip_and_color_jitter, blur(0.5), normalize,
        ])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        views = [self.global_transfo1(image), self.global_transfo2(image)]
        views += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return views
