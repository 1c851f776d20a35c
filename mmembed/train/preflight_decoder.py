"""What a run checks before any work of its decoder section: whether it copies model.init_from's
whole space (and which towers it then reads through), its instruction manifests, and the tasks and
prompt media that decoder.data's selection keeps, and whether its rows make a batch.
`preflight.check_config` runs these; a resume's checks are in preflight_resume.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmembed.config import Config
from mmembed.errors import ConfigError, UserError
from mmembed.modality import Modality

if TYPE_CHECKING:  # read only when a manifest is
    from mmembed.data.instructions import InstructionSet


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


def _check_decoder_tasks(config: Config) -> None:
    """A task the instruction rows do not have (`decoder.data.tasks=[colr]`), a weight for a task
    the selection by prompt modality leaves out (`{larger: 3}` with `prompt_modalities=[image]`),
    a modality no tower reads, or fewer rows than a batch failed after the whole align stage had
    trained. The rows' tasks and media are known up front for the built-in world and for a
    manifest already on disk (its rows too)."""
    if config.decoder is None:
        return
    data = config.decoder.data
    rows = _manifest_rows(config, "train")
    kinds = _manifest_kinds(config, rows)
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
        rows_kept = "the instruction rows" if data.prompt_modalities is None else f"the rows {_SELECTION} keep"
        raise ConfigError(f"decoder.data.task_weights {data.task_weights} drops every task of {rows_kept}: "
                          "give one a weight > 0")
    _check_media_read(config, kept)
    if rows is not None and config.data.synth is None:  # a world data.synth makes is written again, to its size
        _check_enough_rows(config, rows)
    # validation rows go through the same selection, after the align stage: a val file left without rows failed there
    if data.val is not None and (val_kinds := _manifest_kinds(config, _manifest_rows(config, "val"))) is not None:
        _check_media_read(config, _selected(config, "val", val_kinds))


_SELECTION = "decoder.data.tasks / prompt_modalities"


def _manifest_rows(config: Config, key: str) -> InstructionSet | None:
    """The usable rows of `decoder.data.{key}`, read as the decoder stage reads them (bad rows
    skipped, or refused with data.strict); None when the file is not there (yet)."""
    path = Path(config.data.root) / getattr(config.decoder.data, key)
    if not path.is_file():
        return None
    from mmembed.data.instructions import read_instructions

    try:
        return read_instructions(path, root=config.data.root, allow_outside_root=config.data.allow_outside_root,
                                 strict=config.data.strict)
    except UserError as e:  # the file's own error (no usable row, UTF-16), with the key that names it
        raise ConfigError(f"decoder.data.{key}: {e}") from None


def _manifest_kinds(config: Config, rows: InstructionSet | None) -> dict[str | None, set[frozenset[str]]] | None:
    """Each task of `rows` (None: rows without one) with the sets of modalities their prompts
    show (`manifest_kinds`); the world's table when data.synth writes the file; None when
    neither is known yet."""
    if rows is not None:
        kinds: dict[str | None, set[frozenset[str]]] = {}
        for row in rows.rows:
            kinds.setdefault(row.task, set()).add(frozenset(m.value for m, _ in row.media))
        return kinds
    if config.data.synth is not None:  # the world writes it
        from mmembed.data.synth.instructions import TASK_MEDIA

        return TASK_MEDIA
    return None


def _check_enough_rows(config: Config, rows: InstructionSet) -> None:
    """Fewer training rows than a batch ("N usable decoder rows, fewer than decoder.train.batch_size")
    was found after the align stage. Counted as the stage counts them (selected, then weighted);
    rows whose media cannot be read or that outgrow decoder.context, which need the space and its
    tokenizer, only lower the count: so "at most"."""
    data, batch = config.decoder.data, config.decoder.train.batch_size
    kept = rows.select(data.tasks, data.prompt_modalities)
    if data.task_weights:
        kept = kept.weighted(data.task_weights, seed=config.decoder.train.seed)
    if len(kept) < batch:
        raise ConfigError(f"decoder.data.train: {rows.path} keeps at most {len(kept)} usable row(s) after "
                          f"{_SELECTION} / task_weights, fewer than decoder.train.batch_size={batch}: lower the "
                          "batch size, or give more rows")


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


def _world_counts(config: Config) -> dict[str, int]:
    """Scenes per split of the world data.synth makes (held-out: n // 10 unless n_heldout says)."""
    from mmembed.data.synth.world import split_counts

    synth = config.data.synth
    return {**split_counts(synth.n, tuple(synth.split)),
            "heldout": synth.n // 10 if synth.n_heldout is None else synth.n_heldout}
