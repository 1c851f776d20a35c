"""What a run needs before its first step: the data on disk and a tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from mmembed.config import Config, DataConfig
from mmembed.errors import UserError

log = logging.getLogger(__name__)


def prepare_data(data: DataConfig) -> Path:
    """Return the data root; generate the synthetic world there first when configured."""
    root = Path(data.root)
    if data.synth is not None:
        from mmembed.data.synth import generate_world

        s = data.synth
        generate_world(root, n=s.n, seed=s.seed, image_size=s.image_size, split=s.split, n_heldout=s.n_heldout,
                       replace=True)
    from mmembed.data.synth.world_folder import check_complete

    check_complete(root, hint=" (or set data.synth)")
    if not (root / data.train).is_file():
        raise UserError(f"training manifest not found: {root / data.train} "
                        "(set data.root/data.train, or data.synth to generate the built-in world)")
    return root


def captions(manifest: Path, root: Path | None = None, allow_outside_root: bool = False) -> Iterator[str]:
    """Every caption in a JSONL/CSV manifest's `text` (and `captions`, `qa`) columns; `root` and
    `allow_outside_root` as for training (a row refused there is refused here too)."""
    from mmembed.data import read_manifest
    from mmembed.modality import Modality

    for row in read_manifest(manifest, root=root, allow_outside_root=allow_outside_root).rows:
        for value in [row.items.get(Modality.TEXT), *(row.meta.get("captions") or [])]:
            if isinstance(value, str):
                yield value
        qas = row.meta.get("qa")
        for qa in qas if isinstance(qas, list) else []:  # the world's {question, answer} pairs
            if isinstance(qa, dict):
                yield " ".join(str(qa[k]) for k in ("question", "answer") if isinstance(qa.get(k), str))
            elif isinstance(qa, str):  # a manifest's own `qa` column of another shape: its text
                yield qa


def prepare_tokenizer(cfg: Config, root: Path, run_dir: Path | None):
    """Load the configured tokenizer, reuse the run's own on resume, or train one on the
    training captions (vocabulary `tokenizer.vocab_size`)."""
    from mmembed.tokenizer import Tokenizer, load_tokenizer

    tok = cfg.tokenizer
    if run_dir is not None and (run_dir / "tokenizer.json").is_file():
        return load_tokenizer(run_dir / "tokenizer.json")
    if tok.kind == "clip":
        return load_tokenizer("clip")
    if tok.path is not None:
        if not Path(tok.path).exists():
            raise UserError(f"tokenizer.path not found: {tok.path}")
        return load_tokenizer(tok.path)
    texts = list(captions(root / cfg.data.train, root, cfg.data.allow_outside_root))
    if not texts:
        raise UserError(f"no captions in {root / cfg.data.train} to train a tokenizer on"
                        f"{_caption_hints(root / cfg.data.train, root, cfg.data.allow_outside_root)}")
    log.info("training a %d-token BPE tokenizer on %d captions", tok.vocab_size, len(texts))
    return Tokenizer.train(texts, vocab_size=tok.vocab_size)


def _caption_hints(manifest: Path, root: Path, allow_outside_root: bool) -> str:
    """Why a manifest gave no caption: a column that looks like `text` (rename it), else "; set tokenizer.path"."""
    from mmembed.data import read_manifest
    from mmembed.data.manifest import column_hints
    from mmembed.modality import Modality

    read = read_manifest(manifest, root=root, allow_outside_root=allow_outside_root)
    hints = column_hints(read.meta_columns, {Modality.TEXT})
    return f" ({'; '.join(hints)}): rename the column, or set tokenizer.path" if hints else "; set tokenizer.path"
