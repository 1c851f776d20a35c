"""What a run checks by building or reading what its stages will use, before any work: each
tower, its preprocessor and the captioner, built once untrained (values only their builders check),
and the GPT-2 folder the decoder stage starts from, read as that stage reads it (config.json, the
tokenizer, the weights' headers; not the tensors). `preflight.check_config` runs these."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from mmembed.config import Config, TowerConfig
from mmembed.config_decoder import DecoderConfig
from mmembed.errors import CheckpointError, ConfigError, UserError
from mmembed.modality import Modality


# the CPU allocator's "can't allocate memory: you tried to allocate N bytes"
_ASKED = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
# the vocabulary size only sizes a table: any stands in for the tokenizer's, trained later
_PLACEHOLDER_VOCAB = 512


def check_built(config: Config) -> None:
    """Values only the builders check (heads that do not divide a width, a negative image size,
    the captioner's shape) were found after the world was generated and the tokenizer trained.
    Each tower, preprocessor and the captioner is built once here, with a placeholder vocabulary
    and without pretrained weights. (A copied space is the source run's, built already: the
    caller leaves it out.)"""
    from mmembed.space import build_space

    for name, tower in config.model.towers.items():
        one = dataclasses.replace(config.model, towers={name: tower})
        _built(lambda: build_space(one, _PLACEHOLDER_VOCAB, config.loss.kind, pretrained=False),
               f"model.towers.{name} (model.embed_dim={config.model.embed_dim})")
        _preprocessor(name, tower)
    if config.loss.caption_weight > 0:
        _check_captioner(config)


def _built(build, what: str) -> torch.nn.Module:
    """`build()` on the meta device (nothing allocated nor initialised); on the CPU where a module
    computes a buffer from values at construction (rotary angles, mel filters), which meta lacks.
    Sizes beyond the machine's memory (`model.embed_dim=1e9`: a 512 GB projection) were the CPU
    allocator's traceback, at once or when the stage built the model: ConfigError naming `what`."""
    try:
        with torch.device("meta"):
            module = build()
    except (NotImplementedError, RuntimeError):
        try:
            module = build()
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            asked = _ASKED.search(str(e))
            if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and asked is None:
                raise
            size = f" ({int(asked.group(1)) / 1e9:.3g} GB at once)" if asked else ""
            raise ConfigError(f"{what}: too large to build in this machine's memory{size}: check its sizes") from None
    held = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the allocator is the check
        return module
    if held > memory:
        raise ConfigError(f"{what}: {held / 1e9:.3g} GB of weights, more than this machine's {memory / 1e9:.3g} GB "
                          "of memory: check its sizes")
    return module


class _NoTokenizer:
    """Stands in for the tokenizer the text preprocessor keeps (it reads it only when encoding)."""

    vocab_size = _PLACEHOLDER_VOCAB


def _preprocessor(name: str, tower: TowerConfig):
    from mmembed.preprocess import build_preprocessor

    try:
        return build_preprocessor(name, tower.preprocess, tokenizer=_NoTokenizer())
    except (ConfigError, ValueError) as e:  # "image preprocess: size must be positive": name the key
        message = str(e).removeprefix(f"{Modality.parse(name)} preprocess: ")
        raise ConfigError(message if "model.towers." in message else f"model.towers.{name}.preprocess: {message}") \
            from None


def _check_captioner(config: Config) -> None:
    from mmembed.train.captioning import Captioner

    text = config.model.towers.get("text")
    if text is None:
        raise ConfigError(f"loss.caption_weight {config.loss.caption_weight}: the captioner writes each row's caption, "
                          f"and model.towers ({', '.join(config.model.towers)}) has no text tower: add one, or set "
                          "loss.caption_weight=0")
    length, sizes = _preprocessor("text", text).max_length, config.loss.captioner
    try:
        _built(lambda: Captioner(config.model.embed_dim, _PLACEHOLDER_VOCAB, caption_len=length, **sizes),
               f"loss.captioner (model.embed_dim={config.model.embed_dim})")
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss.captioner: {e}") from None


def check_gpt2(decoder: DecoderConfig) -> None:
    """A GPT-2 folder the decoder stage cannot load (no tokenizer, a truncated weights file, another
    model_type, too few positions for one prompt) was found after the whole align stage. Its
    config.json and tokenizer are read here, and its weights' headers: not the tensors."""
    from mmembed.decoder.gpt2 import gpt2_architecture, gpt2_tokenizer

    folder = Path(decoder.init_from_gpt2)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"decoder.init_from_gpt2: {folder} has no config.json (a GPT-2 folder saved by transformers)")
    try:
        positions = gpt2_architecture(folder)["max_len"]
        gpt2_tokenizer(folder)
        _check_gpt2_weights(folder)
    except UserError as e:
        raise ConfigError(f"decoder.init_from_gpt2: {e}") from None
    if positions < decoder.soft_tokens + 6:  # as DecoderConfig checks decoder.context, which n_positions sets
        raise ConfigError(f"decoder.init_from_gpt2: {folder}'s n_positions {positions} is shorter than "
                          f"decoder.soft_tokens + 6 = {decoder.soft_tokens + 6}, the shortest prompt with one media "
                          "item and a one-token answer: lower decoder.soft_tokens, or take a GPT-2 with more positions")


def _check_gpt2_weights(folder: Path) -> None:
    """The weights file load_gpt2 will read (or its shards) is there, and a safetensors one's header
    covers the file (a truncated one's does not). A pickle is only read whole, when it loads."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _check_header(folder / name)
        if (index := folder / f"{name}.index.json").is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise CheckpointError(f"{index}: not a shard index of transformers ({type(e).__name__}: {e})") from None
            for shard in shards:
                path = index.parent / shard if isinstance(shard, str) else None
                if path is None or path.parent != index.parent or not path.is_file():
                    raise CheckpointError(f"{index}: shard {shard!r} is not a file in {index.parent}")
                _check_header(path)
            return None
    raise UserError(f"no model.safetensors or pytorch_model.bin (or their shard index) in {folder}")


def _check_header(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    from mmembed.checkpoint import utf8_name

    if path.suffix != ".safetensors" or not utf8_name(path):  # safetensors opens UTF-8 names only
        return
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
