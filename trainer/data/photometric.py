"""DINO's colour augmentations for a whole batch of crops on the training device, each sample with its own draw.

The `device` augmentation backend splits the multi-crop recipe in two. Loader workers decode, crop, resize and
flip (uint8, cheap) and draw every remaining random choice of each view: whether colour jitter applies, in
which order its four operations run and their factors, grey-scale, the blur radius, solarisation. The
training process then runs the colour work here, once per crop group on the GPU, where it costs a fraction of
a step instead of most of a loader core. The draws stay in the loader, under the per-sample seed, so the
stream is still a pure function of (seed, epoch, index).

Every operation matches torchvision's float functional op of the same name on each sample (tested); only
the intermediate rounding differs from the uint8 pipelines (nothing is rounded to 8 bits between operations
here). Which samples each operation applies to is read from the draws on the host, so the device never waits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The columns of a view's parameter row (float32; flags are 0/1, the order holds operation ids 0-3).
JITTER, ORDER, FACTORS, GREY, SIGMA, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11
PARAMS = 12


class DeviceViews(NamedTuple):
    """A sample's (or, collated, a batch's) views before their colour work: uint8 crops and their draws.

    views[v] is (3, H, W) uint8 (batched: (B, 3, H, W)); params is (V, PARAMS) float32 (batched: (B, V, PARAMS)).
    """

    views: list[torch.Tensor]
    params: torch.Tensor


def grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of (B, 3, H, W) RGB, (B, 1, H, W): torchvision's `rgb_to_grayscale` weights."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x).clamp(0.0, 1.0)  # a blend with black


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grey(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grey(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (HSV round trip, torchvision's formulas)."""
    h, s, v = _rgb_to_hsv(x).unbind(dim=-3)
    return _hsv_to_rgb(torch.stack(((h + shift.squeeze(-3)) % 1.0, s, v), dim=-3))



#: The jitter operations by id, as torchvision's ColorJitter numbers them (the ids the order column holds).
JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    equal = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    s = chroma / torch.where(equal, ones, maxc)
    chroma_safe = torch.where(equal, ones, chroma)
    rc, gc, bc = (maxc - r) / chroma_safe, (maxc - g) / chroma_safe, (maxc - b) / chroma_safe
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    sector = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    # for each sector of the hue circle, which of (v, p, q, t) each of r, g, b is
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    return vpqt.gather(-3, table[:, sector].movedim(0, -3))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """A separable Gaussian of standard deviation sigma[b] per sample over a (2 radius + 1) window, reflected
    at the borders (torchvision's `gaussian_blur`); sigma 0 leaves a sample unchanged."""
    batch, channels, height, width = x.shape
    radius = min(radius, height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    safe = sigma.reshape(batch, 1).clamp_min(1e-6)
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*C, 2r+1)
    flat = F.pad(x.reshape(1, batch * channels, height, width), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


class BatchPhotometric:
    """The colour half of the multi-crop recipe on collated `DeviceViews`: jitter, grey, blur, solarise, normalise.

    Each operation runs only on the samples drawn for it: the subsets are read from the parameters while they
    are still on the host (the loader's tensor), and their indices reach the device in one copy per crop group,
    so the device never waits on the host and no sample is computed for an operation it does not get.
    `max_blur_radius` (the upper end of `crops.blur_radius`) sizes the blur window at three standard deviations.
    """

    def __init__(self, max_blur_radius: float) -> None:
        self.window = max(1, math.ceil(3.0 * max_blur_radius))

    def __call__(self, batch: DeviceViews, device: torch.device) -> list[torch.Tensor]:
        host = batch.params.cpu()
        params = batch.params.to(device, non_blocking=True)
        return [
            self.view(crop.to(device, non_blocking=True), params[:, v], host[:, v])
            for v, crop in enumerate(batch.views)
        ]

    def view(self, crop: torch.Tensor, params: torch.Tensor, host: torch.Tensor | None = None) -> torch.Tensor:
        """One crop group: (B, 3, H, W) uint8 and its (B, PARAMS) draws -> normalised float32.

        `host` is a host copy of `params` (taken from `params` when not given, which waits for a device)."""
        host = params.cpu() if host is None else host
        jitter = host[:, JITTER] > 0
        masks = [jitter & (host[:, ORDER][:, position] == op_id) for position in range(4) for op_id in range(4)]
        masks += [host[:, GREY] > 0, host[:, SIGMA] > 0, host[:, SOLARIZE] > 0]
        subsets = _to_device([mask.nonzero().squeeze(1) for mask in masks], len(host), crop.device)
        factors = params[:, FACTORS].reshape(-1, 4, 1, 1, 1)
        x = crop.float() / 255.0
        for position in range(4):
            for op_id, adjust in enumerate(JITTER_OPS):
                x = _on(x, subsets[4 * position + op_id], adjust, factors[:, op_id])
        grey_subset, blur_subset, solarize_subset = subsets[16:]
        x = _on(x, grey_subset, lambda sub, _: grey(sub).expand_as(sub), params)
        x = _on(x, blur_subset, partial(gaussian_blur, radius=self.window), params[:, SIGMA])
        x = _on(x, solarize_subset, lambda sub, _: torch.where(sub >= 128 / 255, 1.0 - sub, sub), params)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _to_device(indices: list[torch.Tensor], batch: int, device: torch.device) -> list[torch.Tensor | None]:
    """Index tensors on `device` in one (pinned, asynchronous) copy, None for a subset that is the whole batch.
    Their lengths are known on the host, so splitting them waits for nothing."""
    flat = torch.cat(indices)
    if device.type != "cpu":
        flat = flat.pin_memory().to(device, non_blocking=True)
    parts: list[torch.Tensor | None] = []
    offset = 0
    for index in indices:
        parts.append(None if len(index) == batch else flat.narrow(0, offset, len(index)))
        offset += len(index)
    return parts


def _on(
    x: torch.Tensor,
    index: torch.Tensor | None,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    per_sample: torch.Tensor,
) -> torch.Tensor:
    """x with fn(samples, their rows of per_sample) applied to the samples in `index` (None: all; empty: none)."""
    if index is None:
        return fn(x, per_sample)
    if len(index) == 0:
        return x
    return x.index_copy_(0, index, fn(x.index_select(0, index), per_sample.index_select(0, index)))  # x is ours
