"""A data stream that is a pure function of (seed, epoch, position), so a resumed run sees the same batches.

The sampler shuffles each epoch from (seed, epoch) like DistributedSampler and can start mid-epoch; the
augmentation of every sample is seeded from (seed, epoch, index), independent of workers and processes.
`backend="tensor"` decodes image folders with torchvision.io (uint8 tensors) and augments with the v2
pipeline of `trainer.data.augment`, "device" decodes alike and leaves the colour work to the training process;
"pil" (default) is the official PIL pipeline.
"""

from __future__ import annotations

import hashlib
import math
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from trainer.config import TrainConfig
from trainer.data.augment import build_augmentation
from trainer.data.datasets import DatasetError, ImageFolder, build_dataset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TensorImageFolder(Dataset[tuple[torch.Tensor, int]]):
    """The files of an ImageFolder decoded by torchvision.io (libjpeg-turbo) into uint8 (3, H, W) RGB tensors."""

    def __init__(self, folder: ImageFolder) -> None:
        self.samples: list[tuple[str, int]] = list(folder.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return decode_rgb(path), int(target)


def decode_rgb(path: str | Path) -> torch.Tensor:
    """A JPEG/PNG file as a uint8 (3, H, W) RGB tensor (grey and CMYK images converted)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    image: torch.Tensor = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    return image


class SeededMultiCrop(Dataset[tuple[Any, int]]):
    """Applies the multi-crop augmentation under RNG state derived from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset[tuple[Any, int]], transform: Callable[[Any], Any], seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key
        image, label = self.dataset[index]
        seed = sample_seed(self.seed, epoch, index)
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                views = self.transform(image)
            finally:
                random.setstate(python_state)
        return views, label


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's batches of (epoch, index) for one epoch, full batches only, from `start_batch` on."""

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(size / world_size)
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise DatasetError(
                f"{size} images give no full batch of {batch_size} per process on {world_size} process(es); "
                "lower optim.batch_size_per_gpu or add data"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.per_rank * self.world_size - self.size]  # pad so every rank has as many
        mine = order[self.rank :: self.world_size]
        for b in range(self.start_batch, self.batches_per_epoch):
            yield [(self.epoch, i) for i in mine[b * self.batch_size : (b + 1) * self.batch_size]]


def _ignore_preemption_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the training process, which checkpoints before it stops them.

    SLURM and `timeout` signal the whole process group; a worker killed first would make the main
    process fail while it writes the preemption checkpoint.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def close_loader(loader: DataLoader[Any]) -> None:
    """Stop the loader's persistent workers now, not at interpreter exit.

    At exit PyTorch leaves its workers to multiprocessing's exit hook, which sends daemonic children SIGTERM
    and then joins them. Ours ignore SIGTERM (`_ignore_preemption_signals`), so a worker still alive then
    would keep a finished training process waiting for it forever.
    """
    iterator, loader._iterator = loader._iterator, None
    if isinstance(iterator, _MultiProcessingDataLoaderIter):
        iterator._shutdown_workers()


def build_loader(
    cfg: TrainConfig, rank: int = 0, world_size: int = 1, pin_memory: bool = False
) -> tuple[DataLoader[tuple[Any, int]], EpochBatchSampler]:
    """The training stream; `data.augment_backend` picks the decode + augmentation pipeline ('pil' is the
    official one). Its batches go to the device through `build_device_stage` of the same backend."""
    backend = cfg.data.augment_backend
    raw: Dataset[tuple[Any, int]] = build_dataset(cfg.data)
    if backend in ("tensor", "device") and isinstance(raw, ImageFolder):
        raw = TensorImageFolder(raw)
    if cfg.data.max_samples is not None and cfg.data.max_samples < len(raw):  # type: ignore[arg-type]
        raw = Subset(raw, range(cfg.data.max_samples))
    dataset = SeededMultiCrop(raw, build_augmentation(cfg.crops, backend), cfg.seed)
    sampler = EpochBatchSampler(
        len(dataset), cfg.optim.batch_size_per_gpu, seed=cfg.seed, rank=rank, world_size=world_size
    )
    generator = torch.Generator()
    generator.manual_seed(cfg.seed)  # keeps DataLoader from drawing on the global RNG
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=pin_memory,
        persistent_workers=cfg.data.num_workers > 0,
        generator=generator,
        worker_init_fn=_ignore_preemption_signals,
    )
    return loader, sampler
