"""Parameter-free preprocessing: one raw item → one tensor, per modality.

Preprocessors are plain picklable objects (they run inside DataLoader workers) with

    modality: Modality
    stochastic: bool                        # True if two calls on one item may differ (augmentation)
    random_options: tuple[str, ...]         # the arguments that make it stochastic when training
    __call__(item) -> Tensor                # raises mmembed.errors.BadInput(reason); a stochastic one
                                            # also takes generator= (a dataset's per-sample generator,
                                            # None: the global RNG) and draws only from it
    collate(samples) -> (batch, mask | None)

and optionally a random step on the output of `__call__`, which a dataset runs after its cache
(so cached features still get a fresh draw every epoch):

    augments: bool                          # True if `augment` is random
    augment(tensor, generator) -> Tensor    # a new tensor; the input stays intact

`build_preprocessor` turns a YAML `preprocess:` block into one, with the same unknown-key and
wrong-type errors as the rest of the config.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

from torch import Tensor

from mmembed.config import check_kwargs
from mmembed.errors import ConfigError
from mmembed.modality import Modality
from mmembed.preprocess.audio import AudioPreprocessor
from mmembed.preprocess.image import CLIP_MEAN, CLIP_STD, ImagePreprocessor
from mmembed.preprocess.image_decode import load_image
from mmembed.preprocess.text import TextPreprocessor


class Preprocessor(Protocol):
    modality: Modality
    stochastic: bool
    random_options: tuple[str, ...]

    def __call__(self, item: Any) -> Tensor: ...

    def collate(self, samples: list[Tensor]) -> tuple[Tensor, Tensor | None]: ...

    def example(self) -> Any:
        """A raw item this preprocessor turns into its largest input (a blank image, silence of
        the longest clip, a caption of the most tokens): what training checks its tower accepts,
        and what a tower runs on when a sharded step needs it to run without data."""


PREPROCESSORS: dict[Modality, type] = {
    Modality.TEXT: TextPreprocessor,
    Modality.IMAGE: ImagePreprocessor,
    Modality.AUDIO: AudioPreprocessor,
}

# arguments the caller supplies; a config block that sets them is a mistake worth naming
_RESERVED = ("train", "tokenizer")


def build_preprocessor(
    modality: Modality | str,
    args: dict[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    train: bool = False,
    source: str = "config",
) -> Preprocessor:
    """Build the preprocessor for `modality` from its YAML `preprocess:` arguments.

    Args:
        modality: which registry entry.
        args: keyword arguments from the config, validated against the class signature.
        tokenizer: the model's tokenizer, for preprocessors that take one (text); ignored otherwise.
        train: enable training-only randomness (augmentation, random crops, SpecAugment).
        source: the config file's name, for error messages.

    Returns:
        A preprocessor. Raises ConfigError naming the bad key.
    """
    try:
        modality = Modality.parse(modality)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    if modality not in PREPROCESSORS:
        valid = ", ".join(PREPROCESSORS)
        raise ConfigError(f"{source}: no preprocessor for modality {modality!r} (valid: {valid})")
    cls = PREPROCESSORS[modality]
    where = f"model.towers.{modality}.preprocess"
    args = dict(args or {})
    for key in _RESERVED:
        if key in args:
            raise ConfigError(f"{source}: {where}.{key} is set by the program, not the config; remove it")
    kwargs = check_kwargs(cls, args, where=where, source=source)
    if "tokenizer" in inspect.signature(cls).parameters:
        if tokenizer is None:
            raise ConfigError(f"{source}: the {modality} preprocessor needs the model's tokenizer")
        return cls(tokenizer, train=train, **kwargs)
    return cls(train=train, **kwargs)


__all__ = [
    "PREPROCESSORS",
    "Preprocessor",
    "build_preprocessor",
    "ImagePreprocessor",
    "AudioPreprocessor",
    "TextPreprocessor",
    "load_image",
    "CLIP_MEAN",
    "CLIP_STD",
]
