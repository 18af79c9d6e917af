"""DINO and DINO+SelfPatch pretraining of timm ViTs.

from trainer import train, load_config
result = train(load_config("tiny_cpu", ["optim.epochs=2"]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]

if TYPE_CHECKING:
    from trainer.callbacks import TrainResult
    from trainer.config import TrainConfig
    from trainer.presets import load_config
    from trainer.train import train


def __getattr__(name: str) -> Any:  # lazy: `import trainer` stays cheap for the CLI and the API
    if name == "train":
        from trainer.train import train

        return train
    if name == "TrainConfig":
        from trainer.config import TrainConfig

        return TrainConfig
    if name == "TrainResult":
        from trainer.callbacks import TrainResult

        return TrainResult
    if name == "load_config":
        from trainer.presets import load_config

        return load_config
    raise AttributeError(name)
