"""What a run checks before any work: the names and files its config points at.

The config's own ranges are checked when it loads (config.py). These checks need the file system,
the model's registries or its builders (each tower, preprocessor and the captioner is built once,
untrained and without pretrained weights, for its values), so they run when training starts,
before the world is generated, the tokenizer trained or the run folder written (a typo in
`loss.anchor` used to surface after all three). A finished run's config.yaml, which `mm.load`
reads long after, is not held to them: the run it started from may be gone by then.
`check_config` runs them all; this file holds the towers', loss', sources', devices' and metrics'
checks; the decoder section's are in preflight_decoder.py, a resume's in preflight_resume.py,
and those that build or read what the stages use in preflight_build.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from mmembed.config import Config, DataConfig, TowerConfig
from mmembed.config_decoder import DecoderConfig
from mmembed.errors import ConfigError, UserError
from mmembed.modality import Modality
from mmembed.train.preflight_build import check_built, check_gpt2
from mmembed.train.preflight_decoder import (_check_copied_space, _check_decoder_manifests, _check_decoder_tasks,
                                             _source_towers, _space_copied, _world_counts)
from mmembed.train.preflight_resume import _check_same_space


# what each stage's validation reports (metrics.jsonl writes them with a "val/" prefix, also taken)
ALIGN_METRICS = ("recall@1", "recall@5", "recall@10", "median_rank", "mean_rank", "mrr")
DECODER_METRICS = ("loss", "token_accuracy", "answer_accuracy")
_PAIR_RECALL = re.compile(r"(\w+)→(\w+)/recall@1")  # one ordered pair's, e.g. "image→text/recall@1"


def check_config(config: Config, resume: bool = False) -> None:
    """ConfigError naming the first key whose value cannot work. A resumed run is not held to the
    files it started from (its tokenizer and space are in its folder by then)."""
    _check_towers(config)
    _check_copied_space(config)
    _check_loss(config)
    if resume:
        _check_same_space(config)
    else:
        _check_sources(config)
        _check_token_ids(config)
    if not _space_copied(config):
        check_built(config)
    _check_world_splits(config)
    _check_named_splits(config, resume)
    _check_decoder_manifests(config)
    _check_decoder_tasks(config)
    _check_devices(config)
    # a copied space's towers are the source run's, and its align stage does not run
    paired = [m.value for m in Modality] if _space_copied(config) else list(config.model.towers)
    _check_metric("train", config.train.early_stop_metric, ALIGN_METRICS, paired)
    if config.decoder is not None:
        _check_metric("decoder.train", config.decoder.train.early_stop_metric, DECODER_METRICS)


def _check_metric(where: str, name: str, known: tuple[str, ...], paired: list[str] | None = None) -> None:
    """A metric validation never reports was a warning at the first evaluation (168 steps into the
    demo), and then no best checkpoint was kept nor early stop made. Validation reports each
    ordered pair of the `paired` modalities' recall@1 (`pairwise_report` names it "image→text")."""
    bare = name.removeprefix("val/")
    pair = _PAIR_RECALL.fullmatch(bare) if paired is not None else None
    if bare in known or (pair and pair[1] != pair[2] and {pair[1], pair[2]} <= set(paired)):
        return
    extra = ""
    if paired is not None and len(paired) > 1:
        extra = f", or a pair's of model.towers ({', '.join(paired)}), e.g. {paired[0]}→{paired[1]}/recall@1"
    raise ConfigError(f"{where}.early_stop_metric {name!r} is not a validation metric of this stage "
                      f"(valid: {', '.join(known)}{extra})")


def _check_towers(config: Config) -> None:
    from encoders import ENCODERS

    model = config.model
    if not model.towers and model.init_from is None:
        raise ConfigError("model.towers: a shared space needs at least one tower (text, image or audio), "
                          "or model.init_from to take one from")
    for name, tower in model.towers.items():
        try:
            Modality.parse(name)
        except ValueError as e:
            raise ConfigError(f"model.towers.{name}: {e}") from None
        if tower.encoder not in ENCODERS:
            raise ConfigError(f"model.towers.{name}.encoder: unknown encoder {tower.encoder!r}; valid: "
                              f"{', '.join(sorted(ENCODERS))}")
        _check_tower_arguments(name, tower)
    unknown = [t for t in model.init_towers or () if t not in model.towers]
    if unknown:
        raise ConfigError(f"model.init_towers: {', '.join(map(repr, unknown))} is not one of model.towers "
                          f"({', '.join(model.towers)})")


def _check_tower_arguments(name: str, tower: TowerConfig) -> None:
    """A misspelt encoder or preprocess argument (`augmnt`) was found after the world was generated
    and the tokenizer trained. Names only: the values are checked as the tower is built."""
    from encoders import ENCODERS
    from mmembed.preprocess import PREPROCESSORS
    from mmembed.typed_config import check_kwargs

    check_kwargs(ENCODERS[tower.encoder], dict(tower.encoder_args), f"model.towers.{name}.encoder_args")
    check_kwargs(PREPROCESSORS[Modality.parse(name)], dict(tower.preprocess or {}),
                 where=f"model.towers.{name}.preprocess", source="config")


def _check_loss(config: Config) -> None:
    """A loss that pairs none of the towers ("the loss trains no modality pair") was found after
    the world was generated and the tokenizer trained."""
    from mmembed.losses import build_loss

    loss = build_loss(config.loss)  # its anchor and pair weights name modalities, each pair once
    if _space_copied(config):  # no align stage: the loss trains nothing
        return
    towers = [Modality.parse(name) for name in config.model.towers]
    if loss.pairs(towers):
        return
    have = ", ".join(config.model.towers) or "none"
    if len(towers) < 2:
        raise ConfigError(f"model.towers: a contrastive space needs at least two towers, got {len(towers)} ({have}): "
                          "add one, or copy a trained space with model.init_from and a decoder section")
    if loss.anchor is not None and loss.anchor not in towers:
        raise ConfigError(f"loss.anchor {loss.anchor.value!r} is not one of model.towers ({have}), so the loss "
                          "trains no modality pair: anchor one of them")
    raise ConfigError(f"loss.pair_weights {dict(config.loss.pair_weights)} switch off every pair of model.towers "
                      f"({have}), so the loss trains none: give one a weight > 0")


def _check_sources(config: Config) -> None:
    tok = config.tokenizer
    if tok.path is not None and not Path(tok.path).is_file():
        raise ConfigError(f"tokenizer.path: no tokenizer file at {tok.path}")
    if tok.kind == "bpe" and tok.path is None:
        from mmembed.tokenizer import MAX_VOCAB, vocab_floor

        floor = vocab_floor()
        if not floor <= tok.vocab_size <= MAX_VOCAB:  # above, the trainer aborts allocating for all of it
            raise ConfigError(f"tokenizer.vocab_size must be in [{floor}, {MAX_VOCAB:,}] (256 bytes and the special "
                              f"tokens at least), got {tok.vocab_size:,}")
    if config.model.init_from is not None and not (Path(config.model.init_from) / "model.safetensors").is_file():
        raise ConfigError(f"model.init_from: {config.model.init_from} holds no trained model (model.safetensors)")
    if config.decoder is not None and config.decoder.init_from_gpt2 is not None:
        check_gpt2(config.decoder)


def _check_devices(config: Config) -> None:
    """A device this machine lacks, or a name torch does not know (`gpu`): the decoder stage's was
    found after the whole align stage, in a message without its key. A copied space trains no
    align stage. And what the decoder stage trains must suit how it shards."""
    if not _space_copied(config):
        stage_device("train", config.train.device)
    if config.decoder is not None:
        stage_device("decoder.train", config.decoder.train.device)
        check_sharding(config.decoder)


def stage_device(where: str, name: str) -> torch.device:
    """`{where}.device` resolved (`resolve_device`); a ConfigError naming the key when this machine
    cannot run it."""
    from mmembed.train.distributed import resolve_device

    try:
        return resolve_device(name)
    except UserError as e:  # its message begins "device 'gpu' ...": the key goes before it
        raise ConfigError(f"{where}.{e}") from None


def check_sharding(decoder: DecoderConfig) -> None:
    """ConfigError when what the decoder stage trains cannot be sharded by FSDP."""
    if decoder.train.fsdp and (decoder.freeze_lm or decoder.lora_rank is not None):
        raise ConfigError("decoder.freeze_lm and decoder.lora_rank train a few embedding rows through a gradient "
                          "hook, which FSDP's flattened parameters do not keep: train with DDP "
                          "(decoder.train.fsdp=false)")


# encoders that pool at the largest token id, which is the end of text in CLIP's vocabulary only
_POOL_AT_LARGEST_ID = ("open_clip_text",)


def _check_token_ids(config: Config) -> None:
    """The ids a text tower reads must be the ones it was built for. An open_clip text tower pools
    at the largest id (CLIP's end of text): with another tokenizer every caption embedded to one
    vector. A tower copied by model.init_from read the ids of a tokenizer trained anew, and a
    frozen one then kept embeddings of other tokens (cosine 0.13 with the source run's vectors)."""
    tok, model = config.tokenizer, config.model
    if model.init_from is not None and config.decoder is not None:  # the space is copied whole, tokenizer too
        return
    for name, tower in model.towers.items():
        if tower.encoder in _POOL_AT_LARGEST_ID and not (tok.kind == "clip" or _eos_is_largest(tok.path)):
            raise ConfigError(f"model.towers.{name}.encoder: {tower.encoder} pools at CLIP's end-of-text id, so it "
                              f"needs tokenizer.kind: clip (got tokenizer.kind: {tok.kind})")
    source = Path(model.init_from) / "tokenizer.json" if model.init_from is not None else None
    if source is None or not source.is_file() or not _copies_token_reader(config):
        return
    if tok.kind == "clip":
        from mmembed.clip_tokenizer import ClipTokenizer

        same = ClipTokenizer.is_marker(source.read_text(encoding="utf-8", errors="replace"))
    else:
        same = tok.path is not None and Path(tok.path).read_bytes() == source.read_bytes()
    if not same:
        mine = "a new tokenizer trained on the captions" if tok.kind == "bpe" and tok.path is None else (
            "CLIP's tokenizer" if tok.kind == "clip" else tok.path)
        raise ConfigError(f"model.init_from: the towers it copies read the ids of {source}, and this run would "
                          f"give them those of {mine}: set tokenizer.path: {source}"
                          f"{' and tokenizer.kind: bpe' if tok.kind == 'clip' else ''}")


def _eos_is_largest(path: str | None) -> bool:
    """Whether the tokenizer file at `path` gives its end of text the largest id (a CLIP one does)."""
    if path is None or not Path(path).is_file():
        return False
    from mmembed.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    return tok.eos_id == tok.vocab_size - 1


def _copies_token_reader(config: Config) -> bool:
    """Whether model.init_from supplies a tower that reads token ids (one whose preprocessor
    takes the tokenizer): one named in init_towers, or without it one the source run has too."""
    import inspect

    from mmembed.preprocess import PREPROCESSORS

    model = config.model
    copied = set(model.init_towers if model.init_towers is not None else model.towers)
    if model.init_towers is None and (theirs := _source_towers(config)) is not None:  # unknown: assume shared
        copied &= set(theirs)
    return any("tokenizer" in inspect.signature(PREPROCESSORS[Modality.parse(name)]).parameters
               for name in copied & set(model.towers))


def _check_named_splits(config: Config, resume: bool) -> None:
    """A validation or test manifest named other than by default that is not there: a typo
    (`data.val=vall.jsonl`) trained without validation after a warning, and one of data.test went
    unnoticed into the run's config. The default names (`val.jsonl`, `test.jsonl`), which a user's
    own data may lack, are left to the warning; the built-in world writes its files later."""
    data = config.data
    if data.synth is not None or resume:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    for key in ("val", "test"):
        name = getattr(data, key)
        if name is not None and name != defaults[key] and not (Path(data.root) / name).is_file():
            raise ConfigError(f"data.{key}: {Path(data.root) / name} not found: name a manifest that is there "
                              f"(relative to data.root), or set data.{key}=null for none")


def _check_world_splits(config: Config) -> None:
    """A world whose val split gets no scene while data.val names it (an empty manifest, found
    after the world was generated)."""
    synth, data = config.data.synth, config.data
    if synth is None:
        return
    counts = _world_counts(config)
    if counts["val"] == 0 and data.val is not None:
        raise ConfigError(f"data.synth gives the val split no scene (n={synth.n}, split={list(synth.split)}): "
                          "give it a share, or set data.val=null")
