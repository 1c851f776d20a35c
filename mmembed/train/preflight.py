"""What a run checks before any work: the names and files its config points at.

The config's own ranges are checked when it loads (config.py). These checks need the file system,
the model's registries or its builders (each tower, preprocessor and the captioner is built once,
untrained and without pretrained weights, for its values), so they run when training starts,
before the world is generated, the tokenizer trained or the run folder written (a typo in
`loss.anchor` used to surface after all three). A finished run's config.yaml, which `mm.load`
reads long after, is not held to them: the run it started from may be gone by then.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mmembed.config import Config, DecoderConfig, TowerConfig
from mmembed.errors import ConfigError, UserError
from mmembed.modality import Modality
from mmembed.train.preflight_build import check_built, check_gpt2


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


def _space_copied(config: Config) -> bool:
    """With a decoder, model.init_from's whole space is copied in, not trained (train/__init__.py)."""
    return config.decoder is not None and config.model.init_from is not None


def _check_copied_space(config: Config) -> None:
    """A copied space is the source run's model section, init_towers included: it was ignored."""
    if _space_copied(config) and config.model.init_towers is not None:
        raise ConfigError(f"model.init_towers: a decoder config copies model.init_from's whole space, so "
                          f"init_towers={config.model.init_towers} picks nothing: remove it, or bind new towers "
                          "first in a run without the decoder section, and copy that run")


def _towers(config: Config) -> list[str] | None:
    """The towers the decoder will read through: the config's own, or those of the space a decoder
    config copies from model.init_from (None when its config.yaml cannot be read here)."""
    return _source_towers(config) if _space_copied(config) else list(config.model.towers)


def _source_towers(config: Config) -> list[str] | None:
    """The towers of model.init_from's config.yaml; None when it is missing, old or odd (what it
    lacks is then said as it is copied)."""
    from mmembed.config import load_config

    source = Path(config.model.init_from) / "config.yaml"
    try:
        return list(load_config(source).model.towers) if source.is_file() else None
    except UserError:
        return None


def _check_tower_arguments(name: str, tower: TowerConfig) -> None:
    """A misspelt encoder or preprocess argument (`augmnt`) was found after the world was generated
    and the tokenizer trained. Names only: the values are checked as the tower is built."""
    from encoders import ENCODERS
    from mmembed.preprocess import PREPROCESSORS
    from mmembed.typed_config import check_kwargs

    check_kwargs(ENCODERS[tower.encoder], dict(tower.encoder_args), f"model.towers.{name}.encoder_args")
    check_kwargs(PREPROCESSORS[Modality.parse(name)], dict(tower.preprocess or {}),
                 where=f"model.towers.{name}.preprocess", source="config")


def _check_decoder_tasks(config: Config) -> None:
    """A task the instruction rows do not have (`decoder.data.tasks=[colr]`), a weight for a task
    the selection by prompt modality leaves out (`{larger: 3}` with `prompt_modalities=[image]`),
    or a modality no tower reads failed after the whole align stage had trained. The rows' tasks
    and media are known up front for the built-in world and for a manifest already on disk."""
    if config.decoder is None:
        return
    data = config.decoder.data
    kinds = _manifest_kinds(config, "train")
    if kinds is None:
        return _check_task_selection(config)
    known = sorted(t for t in kinds if t is not None)
    for key, tasks in (("tasks", data.tasks or ()), ("task_weights", data.task_weights)):
        if unknown := sorted(set(tasks) - set(known)):
            raise ConfigError(f"decoder.data.{key}: {', '.join(map(repr, unknown))} is not a task of the instruction "
                              f"rows (their tasks: {', '.join(known)})")
    _check_task_selection(config)
    kept = _selected(config, "train", kinds)
    if left_out := sorted(set(data.task_weights) - set(kept)):
        raise ConfigError(f"decoder.data.task_weights: {', '.join(map(repr, left_out))} names rows {_SELECTION} "
                          f"leave out (the tasks kept: {', '.join(sorted(t for t in kept if t is not None))}): "
                          "drop the weight, or keep the modalities its prompts show")
    if None not in kept and all(data.task_weights.get(t) == 0 for t in kept):  # rows without a task keep weight 1
        rows = "the instruction rows" if data.prompt_modalities is None else f"the rows {_SELECTION} keep"
        raise ConfigError(f"decoder.data.task_weights {data.task_weights} drops every task of {rows}: "
                          "give one a weight > 0")
    _check_media_read(config, kept)
    # validation rows go through the same selection, after the align stage: a val file left without rows failed there
    if data.val is not None and (val_kinds := _manifest_kinds(config, "val")) is not None:
        _check_media_read(config, _selected(config, "val", val_kinds))


_SELECTION = "decoder.data.tasks / prompt_modalities"


def _manifest_kinds(config: Config, key: str) -> dict[str | None, set[frozenset[str]]] | None:
    """The tasks and prompt media of `decoder.data.{key}`'s usable rows, read as the decoder stage
    reads them (bad rows skipped, or refused with data.strict); the world's table when data.synth
    writes it; None when neither is known yet."""
    name = getattr(config.decoder.data, key)
    path = Path(config.data.root) / name
    if path.is_file():
        from mmembed.data.instructions import manifest_kinds

        try:
            return manifest_kinds(path, root=config.data.root, allow_outside_root=config.data.allow_outside_root,
                                  strict=config.data.strict)
        except UserError as e:  # the file's own error (no usable row, UTF-16), with the key that names it
            raise ConfigError(f"decoder.data.{key}: {e}") from None
    if config.data.synth is not None:  # the world writes it
        from mmembed.data.synth.instructions import TASK_MEDIA

        return TASK_MEDIA
    return None


def _selected(config: Config, key: str, kinds: dict[str | None, set[frozenset[str]]]
              ) -> dict[str | None, list[frozenset[str]]]:
    """The tasks and media of the rows decoder.data.tasks / prompt_modalities keep; a ConfigError
    when they keep none."""
    data = config.decoder.data
    allowed = None if data.prompt_modalities is None else {Modality.parse(m).value for m in data.prompt_modalities}
    kept = {task: [m for m in media if allowed is None or m <= allowed] for task, media in kinds.items()
            if data.tasks is None or task in data.tasks}
    kept = {task: media for task, media in kept.items() if media}
    if not kept:
        val_hint = ": give another validation manifest, or decoder.data.val: null for none" if key == "val" else ""
        raise ConfigError(f"decoder.data.{key}: no row of {getattr(data, key)} is left after {_SELECTION}{val_hint}")
    return kept


def _check_media_read(config: Config, kept: dict[str | None, list[frozenset[str]]]) -> None:
    """A modality the kept rows show that no tower of the space reads."""
    shown = set().union(*(m for media in kept.values() for m in media))
    towers = _towers(config)
    if towers is not None and (lacking := sorted(shown - set(towers))):
        where = (f"the space of model.init_from {config.model.init_from}" if _space_copied(config)
                 else "model.towers")
        raise ConfigError(f"decoder.data: the instruction rows show {', '.join(lacking)}, and {where} has no such "
                          f"tower: set decoder.data.prompt_modalities to the ones it has ({', '.join(towers)})")


def _check_task_selection(config: Config) -> None:
    """Rows are selected by task before they are weighted: a selection that kept no row, or a
    weight for a task left out, failed after the align stage had trained."""
    if config.decoder is None:
        return
    tasks, weights = config.decoder.data.tasks, config.decoder.data.task_weights
    if tasks is None:
        return
    if not tasks:
        raise ConfigError("decoder.data.tasks: [] keeps no row: name the tasks to keep, or null for all")
    if unselected := sorted(set(weights) - set(tasks)):
        raise ConfigError(f"decoder.data.task_weights: {', '.join(map(repr, unselected))} is not one of "
                          f"decoder.data.tasks ({', '.join(tasks)}), whose rows are the only ones kept: weigh those, "
                          "or add it to decoder.data.tasks")
    if all(weights.get(t) == 0 for t in tasks):
        raise ConfigError(f"decoder.data.task_weights {weights} drops every task of decoder.data.tasks "
                          f"({', '.join(tasks)}): give one a weight > 0")


# where a run's weights and tokenizer came from, not what they are: a resume reads the checkpoint and the
# run's own tokenizer.json, so these may move (a bind run whose source run moved is resumed from its new place)
_WHERE_IT_STARTED = {"model.init_from", "model.init_towers", "tokenizer.path"}


def _check_same_space(config: Config) -> None:
    """A resume's model and tokenizer sections are the run's own (its config.yaml): its weights are
    of that space. A changed one was written into config.yaml before the checkpoint refused it (or
    after the decoder stage finished), and the run no longer loaded. A run whose space was copied
    from model.init_from holds that run's sections instead: the resume keeps them. So are the
    settings that shape the checkpoint's other weights: the captioner the align stage trains beside
    the space (loss.caption_weight zero or not, loss.captioner) while that stage is resumed, and the
    decoder once its stage has a checkpoint; a change failed as the checkpoint loaded, in a raw
    state-dict message (the decoder's after every media item was embedded)."""
    from mmembed.config import load_config
    from mmembed.decoder import DECODER_DIR
    from mmembed.model import CONFIG
    from mmembed.train.state import latest_checkpoint

    run_dir = Path(config.train.out_dir)
    if not (run_dir / CONFIG).is_file():
        return
    ran = load_config(run_dir / CONFIG)
    decoder_started = config.decoder is not None and latest_checkpoint(run_dir / DECODER_DIR) is not None
    changed = []
    if not _space_copied(config):  # a bind run (init_from, no decoder) trains its own space
        changed = _space_changes(ran, config)
        if not decoder_started:  # the align stage resumes: its checkpoint holds the captioner
            changed += _captioner_changes(ran, config)
    if decoder_started and ran.decoder is not None:
        changed += _decoder_changes(ran.decoder, config.decoder)
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}: the run's "
                          f"weights are of its config.yaml; resume without the change, or start over with "
                          "--overwrite")


def _space_changes(ran: Config, config: Config) -> list[str]:
    from mmembed.typed_config import to_dict

    return [change for section in ("model", "tokenizer")
            for change in changes(section, to_dict(getattr(ran, section)), to_dict(getattr(config, section)))
            if change.split(" ")[0] not in _WHERE_IT_STARTED]


def _captioner_changes(ran: Config, config: Config) -> list[str]:
    """The align stage's checkpoint holds a captioner when loss.caption_weight > 0, of loss.captioner's size."""
    was, now = ran.loss, config.loss
    if (was.caption_weight > 0) != (now.caption_weight > 0):
        return [f"loss.caption_weight {was.caption_weight!r} -> {now.caption_weight!r}"]
    return changes("loss.captioner", dict(was.captioner), dict(now.captioner)) if now.caption_weight > 0 else []


# the decoder fields its checkpoint's weights are shaped by, or mean nothing without (heads, the kind of
# positions); GPT-2's come from its folder. Not window, norm_eps or activation: a resume took those before.
_DECODER_SHAPE = ("width", "layers", "heads", "mlp_ratio", "positional", "tie_embeddings", "conv_kernel",
                  "soft_tokens", "projector", "projector_hidden", "whiten", "lora_rank")


def _decoder_changes(was: DecoderConfig, now: DecoderConfig) -> list[str]:
    from mmembed.decoder import with_gpt2_architecture

    if (was.init_from_gpt2 is None) != (now.init_from_gpt2 is None):  # the path itself may move
        return [f"decoder.init_from_gpt2 {was.init_from_gpt2!r} -> {now.init_from_gpt2!r}"]
    try:
        was, now = with_gpt2_architecture(was), with_gpt2_architecture(now)
    except UserError:  # a GPT-2 folder that cannot be read: check_gpt2 names it
        return []
    learned = "learned" in (was.positional, now.positional)  # a table of `context` rows: context shapes it
    shape = [{k: getattr(d, k) for k in _DECODER_SHAPE + (("context",) if learned else ())} for d in (was, now)]
    return changes("decoder", *shape)


def changes(prefix: str, was: dict, now: dict) -> list[str]:
    """`prefix.key old -> new` (`key old -> new` for an empty prefix) for each key of two (nested)
    dicts whose values differ."""
    was, now, dot = _flat(was), _flat(now), "." if prefix else ""
    return [f"{prefix}{dot}{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(was.keys() | now.keys())
            if was.get(k) != now.get(k)]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


def _check_decoder_manifests(config: Config) -> None:
    """The decoder's instruction manifests exist before the align stage runs (a missing one was
    found after it, minutes in). A world `data.synth` makes is written by that stage: a manifest
    not yet there must be one of the files it writes, of a split given scenes."""
    if config.decoder is None:
        return
    from mmembed.data.synth.world import SPLITS

    root, data, synth = Path(config.data.root), config.decoder.data, config.data.synth
    written = {f"instruct-{split}.jsonl": split for split in SPLITS}
    for key, name in (("train", data.train), ("val", data.val)):
        val_hint = " (decoder.data.val: null for none)" if key == "val" else ""
        if name is None or (synth is None or name not in written) and (root / name).is_file():
            continue
        if synth is None or name not in written:
            made = f"; the world data.synth makes writes {', '.join(written)}" if synth is not None else ""
            raise ConfigError(f"decoder.data.{key}: instruction manifest not found: {root / name}{made}{val_hint}")
        # the world data.synth describes, whatever the folder holds now
        if _world_counts(config)[split := written[name]] == 0:
            share = "set data.synth.n_heldout" if split == "heldout" else "give it a share of data.synth.split"
            raise ConfigError(f"decoder.data.{key}: data.synth gives the {split} split no scene, so {name} holds no "
                              f"row: {share}{val_hint}")


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


def _world_counts(config: Config) -> dict[str, int]:
    """Scenes per split of the world data.synth makes (held-out: n // 10 unless n_heldout says)."""
    from mmembed.data.synth.world import split_counts

    synth = config.data.synth
    return {**split_counts(synth.n, tuple(synth.split)),
            "heldout": synth.n // 10 if synth.n_heldout is None else synth.n_heldout}
