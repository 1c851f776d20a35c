"""Opening a run folder: its shared space (`load_space`, with the checks that its weights,
config.yaml and tokenizer.json fit each other), its decoder, and `no_decoder`: why it has none.

The `Model` it returns, its file names and `Model.load` (which adds the decoder) are in `model.py`.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import Tensor, nn

from mmembed.checkpoint import load_tensors, tensor_metadata
from mmembed.config import Config, load_config
from mmembed.errors import CheckpointError, ConfigError, UserError
from mmembed.model import CONFIG, TOKENIZER, WEIGHTS, Model
from mmembed.space import build_space, space_weights

if TYPE_CHECKING:
    from mmembed.decoder import PromptModel


def load_space(run_dir: str | Path) -> Model:
    """The shared space of a run (weights, config, tokenizer) without its decoder."""
    run_dir = Path(run_dir)
    if run_dir.is_file():  # its config.yaml, its weights: the folder is what opens
        raise UserError(f"{run_dir} is a file: give the run's folder ({run_dir.parent})")
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not (run_dir / WEIGHTS).is_file():
        raise CheckpointError(_unfinished(run_dir.resolve()) or f"{run_dir} holds no {WEIGHTS} (is it a run directory?)")
    config = load_config(run_dir / CONFIG)
    tokenizer = _load_tokenizer(run_dir)
    # without the pretrained files or tags it started from: model.safetensors holds every tensor. Its
    # random initial weights draw on the global generator, and the decoder stage's initial weights
    # follow on from those draws (it loads the space after seeding): a caller that must keep its
    # stream (`Model.load`) forks the generator around this call
    try:
        space = build_space(config.model, getattr(tokenizer, "vocab_size", None), config.loss.kind, pretrained=False)
    except ConfigError as e:  # an encoder's own arguments that disagree (n_mels not a multiple of a patch),
        raise ConfigError(f"{run_dir}: {e}") from None  # or a tokenizer.json gone: the run's folder named
    state = space_weights(load_tensors(run_dir / WEIGHTS))  # a checkpoint folder of a captioning run too
    _check_vocabulary(space, state, getattr(tokenizer, "vocab_size", None), run_dir)
    from encoders.weights import state_fault

    if fault := state_fault(space, state):  # load_state_dict casts an integer tensor and loads NaN as is
        raise CheckpointError(f"{run_dir / WEIGHTS}: {fault}")
    try:
        missing, unexpected = space.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape: the weights are not this config's
        reason = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{run_dir / WEIGHTS} does not match config.yaml ({reason[:300]})") from None
    if missing or unexpected:
        raise CheckpointError(f"{run_dir / WEIGHTS} does not match config.yaml "
                              f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    space.eval()
    model = Model(config, space, tokenizer)
    _check_preprocess_fits(model, run_dir)
    model.run_dir = run_dir.resolve()
    return model


def _check_preprocess_fits(model: Model, run_dir: Path) -> None:
    """One dummy input per tower, the largest its preprocess gives: a config.yaml edited after
    training (another image size, n_mels, max_length) loaded, then failed every embed with a
    traceback. A few milliseconds per tower for the demo's (mm.load ~180 -> ~220 ms warm)."""
    from mmembed.train.align_data import check_towers_accept

    largest = {m: pre.collate([pre(pre.example())]) for m, pre in model.preprocessors.items()}
    try:
        check_towers_accept(model.space, largest)
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / CONFIG} does not fit the run's {WEIGHTS}: {e} (is it the config "
                              "this run trained with?)") from None


def _check_vocabulary(space: nn.Module, state: dict[str, Tensor], vocab_size: int | None, run_dir: Path) -> None:
    """Name tokenizer.json when it, not the weights, is what disagrees: a tensor sized by the
    vocabulary in the built space but of another size in the checkpoint."""
    if vocab_size is None:
        return
    for key, built in space.state_dict().items():
        saved = state.get(key)
        if saved is not None and built.ndim and built.shape[0] == vocab_size and saved.shape[0] != vocab_size:
            raise CheckpointError(f"{run_dir / TOKENIZER} has {vocab_size} tokens, but the weights' {key} has "
                                  f"{saved.shape[0]} rows: it is not the tokenizer this run trained with")


def check_decoder_space(run_dir: Path, model: Any) -> None:
    """CheckpointError when the run's decoder was trained on another shared space than its
    model.safetensors (decoder files copied between runs answered, silently, from vectors the
    decoder never read: "yes" for "which colour"). Decoders saved before the space was recorded pass."""
    from mmembed.decoder import DECODER_WEIGHTS
    from mmembed.decoder.builder import SPACE_FINGERPRINT

    trained_on = tensor_metadata(run_dir / DECODER_WEIGHTS).get(SPACE_FINGERPRINT)
    if trained_on is not None and trained_on != model.fingerprint:
        raise CheckpointError(f"{run_dir / DECODER_WEIGHTS} was trained on another shared space (fingerprint "
                              f"{trained_on}; this run's {WEIGHTS} is {model.fingerprint}): its answers would read "
                              "vectors it never learned. Put back the space it was trained with, or train the "
                              "decoder stage on this one (a config with `model.init_from` set to this run)")


def _load_decoder(run_dir: Path, config: Config, tokenizer: Any | None, embed_dim: int) -> PromptModel | None:
    """The run's decoder; None without one (a config without a `decoder:` section, or a decoder
    stage not finished: `no_decoder` says which)."""
    from mmembed.decoder import DECODER_WEIGHTS, load_prompt_model

    if config.decoder is None or not (run_dir / DECODER_WEIGHTS).is_file():
        return None
    # building draws the initial weights that the file's replace: on a copy of the CPU generator, so
    # that opening a run leaves the caller's random stream as it was
    with torch.random.fork_rng(devices=[]):
        return load_prompt_model(run_dir, config.decoder, tokenizer, embed_dim)


def no_decoder(model: Any, what: str) -> str:
    """Why `model` (a `Model` without a decoder) cannot `what`: its run has no decoder stage, or
    one that has not finished (killed mid-stage, it was called "no decoder stage")."""
    from mmembed.decoder import DECODER_DIR, DECODER_WEIGHTS

    config, run = getattr(model, "config", None), getattr(model, "run_dir", None)
    if config is None or config.decoder is None:
        return (f"this run has no decoder stage, so it cannot {what}: train one with a config that has a `decoder:` "
                "section (configs/demo.yaml does)")
    if run is None:
        return f"this model's decoder is not trained, so it cannot {what}: load a run whose decoder stage finished"
    if run.parent.name == "checkpoints" and (run.parent.parent / CONFIG).is_file():  # Model.load opens these too
        return (f"{run} is a checkpoint of the align stage, which holds no decoder, so it cannot {what}: load the "
                f"run's own folder ({run.parent.parent}) once its decoder stage has finished")
    checkpoints = run / DECODER_DIR / "checkpoints"
    held = f" (its checkpoints are in {checkpoints})" if checkpoints.is_dir() and any(checkpoints.iterdir()) else ""
    return (f"the decoder stage of {run} has not finished (no {DECODER_WEIGHTS}), so it cannot {what}: continue "
            f"it with `{_resume_command(run)}`{held}")


def _unfinished(run_dir: Path) -> str | None:
    """Why a run's folder holds no weights yet (they are written when its align stage ends): its
    trainer is under way, or was stopped after a checkpoint; None for any other folder (it was
    called "not a run directory")."""
    from mmembed.file_lock import holder as lock_holder
    from mmembed.train.run_dir import LOCK
    from mmembed.train.state import latest_checkpoint

    if (holder := lock_holder(run_dir / LOCK)) is not None:
        return (f"{run_dir} is still training ({holder} holds its {LOCK}; {WEIGHTS} is written when the align "
                "stage ends), so it cannot be loaded yet: wait for it to finish")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not (run_dir / CONFIG).is_file():
        return None
    return (f"the training of {run_dir} has not finished (no {WEIGHTS}), so it cannot be loaded: continue it with "
            f"`{_resume_command(run_dir)}` (its last checkpoint is {ckpt})")


def _resume_command(run: Path) -> str:
    """The command that continues the run in `run`, from any directory."""
    from mmembed.config import started_in

    # train.out_dir named: config.yaml's may be relative to where the run was trained, or another run's now
    command = shlex.join(["mmembed", "train", str(run / CONFIG), "--resume", f"train.out_dir={_yaml_text(str(run))}"])
    where = started_in(run / CONFIG)  # where its relative paths (data.root, ...) are read from
    if where is None or where == Path.cwd() or not run.is_absolute():
        return command
    return f"cd {shlex.quote(str(where))} && {command}"


def _yaml_text(text: str) -> str:
    """`text` as an override's value reads it back (quoted when YAML would read something else:
    a `: ` or ` #` in a folder's name)."""
    try:
        plain = yaml.safe_load(text) == text
    except yaml.YAMLError:
        plain = False
    return text if plain and not re.search(r"\s#", text) else json.dumps(text, ensure_ascii=False)


def _load_tokenizer(run_dir: Path) -> Any | None:
    if not (run_dir / TOKENIZER).is_file():
        return None
    from mmembed.tokenizer import load_tokenizer

    return load_tokenizer(run_dir / TOKENIZER)
