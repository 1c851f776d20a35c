"""Pretrained GPT-2 from a folder saved by `transformers` (`save_pretrained`), read without it.

    folder/config.json          architecture (n_embd, n_layer, n_head, n_positions, ...)
    folder/model.safetensors    weights (or pytorch_model.bin, loaded with weights_only=True; or
                                shards named by model.safetensors.index.json, as transformers
                                splits a large model)
    folder/tokenizer.json       byte-level BPE (or vocab.json + merges.txt)

GPT-2 is our `Decoder` with learned positions and tanh-GELU. Its `Conv1D` layers store weights
as (in, out), the transpose of `nn.Linear`; its attention's fused c_attn is [q | k | v] with
heads contiguous inside each, the layout of our `qkv` projection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

from encoders.weights import tensor_fault
from mmembed.checkpoint import atomic_write_text, load_torch_weights
from mmembed.errors import CheckpointError, UserError
from mmembed.decoder.model import Decoder
from mmembed.text_encoding import (AllowedSpecial, check_ids, check_text, content_budget, encode_bounded,
                                   resolve_allowed, split_on_specials, with_bos_eos)

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
END_OF_TEXT = "<|endoftext|>"


def gpt2_architecture(folder: str | Path) -> dict[str, Any]:
    """`Decoder` keyword arguments for the GPT-2 in `folder` (from its config.json)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"no config.json in {folder} (a GPT-2 folder is what transformers' save_pretrained writes)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # Recursion: deep nesting
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "gpt2":
        found = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise UserError(f"{path}: model_type {found!r} is not gpt2")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
        raise UserError(f"{path}: attention scaling variants of GPT-2 are not supported")
    activation = cfg.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise UserError(f"{path}: activation {activation!r} not supported (valid: {', '.join(_ACTIVATIONS)})")
    sizes = {}
    for key, default in (("vocab_size", 50257), ("n_embd", 768), ("n_layer", 12), ("n_head", 12),
                         ("n_positions", 1024), ("n_inner", None)):
        value = cfg.get(key, default)
        if value is None and key == "n_inner":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
        sizes[key] = value
    width, heads = sizes["n_embd"], sizes["n_head"]
    if width % heads:
        raise CheckpointError(f"{path}: n_embd {width} is not a multiple of n_head {heads}")
    try:
        eps = float(cfg.get("layer_norm_epsilon", 1e-5))
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: layer_norm_epsilon must be a number, got {cfg['layer_norm_epsilon']!r}") from None
    if not 0 < eps < 1:  # a negative or NaN one loaded and gave NaN logits
        raise CheckpointError(f"{path}: layer_norm_epsilon must be in (0, 1), got {eps!r}")
    return {
        "vocab_size": sizes["vocab_size"],
        "width": width,
        "layers": sizes["n_layer"],
        "heads": heads,
        "mlp_ratio": sizes.get("n_inner", 4 * width) / width,
        "max_len": sizes["n_positions"],
        "positional": "learned",
        "bias": True,
        "tie_embeddings": _tied(cfg, path),
        "activation": _ACTIVATIONS[activation],
        "norm_eps": eps,
    }


def _tied(cfg: dict[str, Any], path: Path) -> bool:
    """config.json's tie_word_embeddings: absent or null is true (transformers' default); a string
    "false" was truthy, tied an untied model and blamed its head for differing from its wte."""
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        return True
    if not isinstance(tie, bool):
        raise CheckpointError(f"{path}: tie_word_embeddings must be true or false, got {tie!r}")
    return tie


def load_gpt2(folder: str | Path, dropout: float = 0.0, window: int | None = None, conv_kernel: int = 0) -> Decoder:
    """A `Decoder` holding the weights of the GPT-2 saved in `folder`.

    Args:
        folder: what `GPT2LMHeadModel.save_pretrained` (or `GPT2Model`'s) wrote.
        dropout: dropout for fine-tuning (GPT-2 used 0.1); 0 for inference.
        window: sliding-window attention span to fine-tune with (GPT-2 was trained without one;
            its learned positions keep generation within its context either way).
        conv_kernel: short convolutions to fine-tune with (`Decoder`); they start at zero, so the
            loaded model computes what GPT-2 does until training moves them.

    Returns:
        The decoder, in eval mode. Raises UserError / CheckpointError with the file at fault.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"GPT-2 folder not found: {folder}")
    arch = gpt2_architecture(folder)
    state, origin = _to_ours(_read_weights(folder), arch["layers"], folder)
    with torch.device("meta"):  # shapes only: config.json's sizes allocate nothing until the weights agree
        shapes = Decoder(**arch, dropout=dropout, window=window, conv_kernel=conv_kernel)
    own = shapes.state_dict()
    tied = shapes.lm_head.weight is shapes.token_embedding.weight
    if tied and "lm_head.weight" in state and "token_embedding.weight" in state:
        # one tensor here: the file's head must be its embedding (transformers keeps wte then)
        if not torch.equal(state.pop("lm_head.weight"), state["token_embedding.weight"]):
            raise CheckpointError(f"{folder}: config.json ties the embeddings (tie_word_embeddings) but the file's "
                                  "lm_head.weight differs from its wte.weight")
    # short convolutions are ours, not GPT-2's: they stay at zero
    required = [k for k in own if not (tied and k == "lm_head.weight") and ".conv." not in k]
    if missing := [k for k in required if k not in state]:
        raise CheckpointError(f"{folder}: {_missing_message(missing, state, origin, arch['layers'])}")
    for k, v in state.items():
        if k not in own:
            continue
        name, flipped = origin[k]  # the file's name, and its shape as stored (Conv1D's (in, out))
        if own[k].shape != v.shape:
            stored, implied = (v.shape, own[k].shape) if not flipped else (v.shape[::-1], own[k].shape[::-1])
            raise CheckpointError(f"{folder}: {name} has shape {tuple(stored)}, config.json implies {tuple(implied)}")
        if fault := tensor_fault(own[k], v):
            raise CheckpointError(f"{folder}: {name} holds {fault}")
    decoder = Decoder(**arch, dropout=dropout, window=window, conv_kernel=conv_kernel)
    decoder.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return decoder.eval()


def _missing_message(missing: list[str], state: dict[str, torch.Tensor], origin: dict[str, tuple[str, bool]],
                     layers: int) -> str:
    """What the weights lack, in the file's names: whole blocks as config.json's n_layer against the
    blocks held, else the first missing tensor."""
    held = sorted({_block_of(k) for k in state} - {-1})
    if held == list(range(len(held))) and all(_block_of(k) >= len(held) for k in missing):  # whole blocks past n
        blocks = f"blocks 0–{held[-1]}" if held else "no blocks"
        return f"config.json says n_layer {layers}, the weights hold {blocks}"
    prefix = "transformer." if any(name.startswith("transformer.") for name, _ in origin.values()) else ""
    return f"the weights lack {len(missing)} tensor(s) of this config (first: {_gpt2_name(missing[0], prefix)})"


def _block_of(ours: str) -> int:
    """The block index of our tensor name, -1 outside the blocks."""
    return int(ours.split(".")[2]) if ours.startswith("transformer.blocks.") else -1


def _gpt2_name(ours: str, prefix: str) -> str:
    """transformers' name for our tensor `ours` (`prefix`: "transformer." as GPT2LMHeadModel saves)."""
    if ours == "lm_head.weight":
        return ours
    if ours == "token_embedding.weight":
        return prefix + "wte.weight"
    if ours == "transformer.positional.embedding.weight":
        return prefix + "wpe.weight"
    if ours.startswith("transformer.norm."):
        return prefix + "ln_f." + ours.removeprefix("transformer.norm.")
    i, rest = ours.removeprefix("transformer.blocks.").split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"{prefix}h.{i}.{_FROM_OURS.get(module, module)}.{kind}"


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _tensors(load_torch_weights(folder / name), folder / name)
        if (folder / f"{name}.index.json").is_file():
            return _read_shards(folder / f"{name}.index.json")
    raise UserError(f"no model.safetensors or pytorch_model.bin (or their shard index) in {folder}")


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint split into shards: the index maps each tensor to its file."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a shard index of transformers ({type(e).__name__}: {e})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: shard {shard!r} is not a file name")
        path = index.parent / shard
        if path.parent != index.parent or not path.is_file():  # a bare file name beside the index
            raise CheckpointError(f"{index}: shard {shard!r} is not a file in {index.parent}")
        state.update(_tensors(load_torch_weights(path), path))
    if missing := sorted(set(weight_map) - set(state)):
        raise CheckpointError(f"{index}: {len(missing)} tensor(s) missing from the shards, e.g. {missing[0]}")
    return state


def _tensors(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (found {type(state).__name__})")
    return state


_BLOCK = {
    "ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj",
}
_FROM_OURS = {ours: theirs for theirs, ours in _BLOCK.items()}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _to_ours(state: dict[str, torch.Tensor], layers: int, folder: Path
             ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, bool]]]:
    """Rename (and transpose Conv1D weights) from transformers' GPT-2 names to ours; a block past
    config.json's n_layer is an error (it was dropped without a word). Also returns, for each of
    our names, the file's name and whether the tensor was transposed: errors name the file's."""
    out, origin = {}, {}
    for name, t in state.items():
        key, ours, flipped = name.removeprefix("transformer."), None, False
        if key == "wte.weight":
            ours = "token_embedding.weight"
        elif key == "wpe.weight":
            ours = "transformer.positional.embedding.weight"
        elif key.startswith("ln_f."):
            ours = "transformer.norm." + key[5:]
        elif key == "lm_head.weight":
            ours = key
        elif m := re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", key):
            i, module, kind = int(m.group(1)), m.group(2), m.group(3)
            if module not in _BLOCK:
                continue  # attn.bias / masked_bias: causal-mask buffers of old checkpoints
            if i >= layers:
                raise CheckpointError(f"{folder}: the weights hold block {i}, but config.json says n_layer {layers}")
            flipped = module in _CONV1D and kind == "weight" and t.ndim == 2
            ours = f"transformer.blocks.{i}.{_BLOCK[module]}.{kind}"
        if ours is not None:
            out[ours], origin[ours] = (t.t().contiguous() if flipped else t), (name, flipped)
    return out, origin


class PretrainedTokenizer:
    """A Hugging Face byte-level BPE tokenizer (GPT-2's) behind mmembed's tokenizer interface.

    GPT-2 has one special token, `<|endoftext|>`, which serves as bos, eos and pad. Typed text
    never becomes a special id (special-token text is encoded as plain characters). A truncation
    or padding saved in the file (transformers saves what its last call set) is dropped: `encode`
    takes `max_length` as `Tokenizer.encode` does, and pads nothing.
    """

    kind = "pretrained"

    def __init__(self, hf: tokenizers.Tokenizer, source: str | Path = "tokenizer") -> None:
        """`source` names the file(s) `hf` was read from, for errors."""
        _check_dense_ids(hf, source)
        self._hf = tokenizers.Tokenizer.from_str(hf.to_str())
        self._plain = tokenizers.Tokenizer.from_str(hf.to_str())
        for t in (self._hf, self._plain):
            t.no_truncation()
            t.no_padding()
        self._plain.encode_special_tokens = True
        self._special = {t.content: i for i, t in sorted(hf.get_added_tokens_decoder().items()) if t.special}
        end = self._special.get(END_OF_TEXT, hf.token_to_id(END_OF_TEXT))
        if end is None:
            raise CheckpointError(f"{source}: tokenizer has no {END_OF_TEXT} token")
        self._special.setdefault(END_OF_TEXT, end)
        self.vocab_size: int = len(hf.get_vocab(with_added_tokens=True))  # ids 0..vocab_size-1, checked above
        self.bos_id = self.eos_id = self.pad_id = end

    def __getstate__(self) -> dict:  # DataLoader workers, deepcopy: `encode_special_tokens` is not pickled
        return {"json": self._hf.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]))

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def encode(self, text: str, *, allowed_special: AllowedSpecial = frozenset(),
               add_bos: bool = False, add_eos: bool = False, max_length: int | None = None) -> list[int]:
        """Text → ids, with the options of `Tokenizer.encode` (special-token text stays text unless
        `allowed_special` names it; `max_length` counts bos/eos and keeps eos)."""
        check_text(text)  # a lone surrogate is BadInput naming its index, not the library's TypeError
        allowed = resolve_allowed(allowed_special, self._special)
        ids = encode_bounded(text, content_budget(max_length, add_bos, add_eos), lambda t: self._encode(t, allowed))
        return with_bos_eos(ids, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def _encode(self, text: str, allowed: frozenset[str]) -> list[int]:
        ids: list[int] = []
        for piece, is_special in split_on_specials(text, allowed):
            ids += [self._special[piece]] if is_special else self._plain.encode(piece, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special: bool = False) -> str:
        """Ids → text; an id outside the vocabulary is a ValueError naming it (the library dropped it)."""
        return self._hf.decode(check_ids(ids, self.vocab_size), skip_special_tokens=skip_special)

    def save(self, path: str | Path) -> Path:
        atomic_write_text(Path(path), self._hf.to_str(pretty=True))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> PretrainedTokenizer:
        path = Path(path)
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # plain Exception on a bad file, a PanicException (no Exception) on some
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({_one_line(e)})") from None
        return cls(hf, path)


def gpt2_tokenizer(folder: str | Path) -> PretrainedTokenizer:
    """The tokenizer saved beside a GPT-2: tokenizer.json, else vocab.json + merges.txt."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return PretrainedTokenizer.load(folder / "tokenizer.json")
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise UserError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")
    try:
        hf = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # as in PretrainedTokenizer.load
        raise CheckpointError(f"{folder}: unreadable vocab.json + merges.txt ({_one_line(e)})") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([END_OF_TEXT])
    return PretrainedTokenizer(hf, vocab)


def _check_dense_ids(hf: tokenizers.Tokenizer, source: str | Path) -> None:
    """Refuse a vocabulary whose ids are not exactly 0..N-1 (N tokens): `vocab_size` counts tokens,
    and `PromptFormat` gives its markers the ids from N on, so an id past N let typed text produce
    a marker's id (and a gap is filled by the library's next added token: two tokens, one id)."""
    by_id = sorted((i, token) for token, i in hf.get_vocab(with_added_tokens=True).items())
    n = len(by_id)
    if by_id and by_id[-1][0] >= n:
        i, token = by_id[-1]
        raise CheckpointError(f"{source}: token {token!r} has the id {i}, but a vocabulary of {n} tokens must have "
                              f"the ids 0..{n - 1}, each once")
    for (i, a), (j, b) in pairwise(by_id):  # no id past N-1: a repeat is what is left
        if i == j:
            raise CheckpointError(f"{source}: tokens {a!r} and {b!r} share the id {i} (each id must name one token)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
