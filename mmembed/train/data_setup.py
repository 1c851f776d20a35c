"""What a run needs before its first step: the data on disk and a tokenizer."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from mmembed.config import Config, DataConfig
from mmembed.errors import UserError

if TYPE_CHECKING:  # read only when a manifest is
    from mmembed.data.manifest import Manifest

log = logging.getLogger(__name__)


def prepare_data(data: DataConfig) -> Path:
    """Return the data root; generate the synthetic world there first when configured."""
    return _prepare(data)[0]


def _prepare(data: DataConfig) -> tuple[Path, dict | None]:
    """The data root, its synthetic world generated first when configured, and that world's
    parameters (None without data.synth); the root's files checked."""
    root, params = Path(data.root), None
    if data.synth is not None:
        from mmembed.data.synth import generate_world
        from mmembed.data.synth.world_folder import holds_other_files

        if holds_other_files(root):  # `mmembed train` and the demo have no --overwrite for it: say what a config does
            raise UserError(f"data.root {root} is not empty and holds no synthetic world made here, which data.synth "
                            f"would write: set data.synth=null to train on the manifests in {root}, or choose an "
                            "empty data.root")

        s = data.synth
        params = generate_world(root, n=s.n, seed=s.seed, image_size=s.image_size, split=s.split,
                                n_heldout=s.n_heldout, replace=True).params
    _check_files(root, data)
    return root, params


def _check_files(root: Path, data: DataConfig) -> None:
    from mmembed.data.synth.world_folder import check_complete

    check_complete(root, hint=" (or set data.synth)")
    if not (root / data.train).is_file():
        raise UserError(f"training manifest not found: {root / data.train} "
                        "(set data.root/data.train, or data.synth to generate the built-in world)")


@contextlib.contextmanager
def data_in_use(data: DataConfig) -> Iterator[Path]:
    """`prepare_data`'s root, held with the data's readers' lock (`world_folder.reading`) while the
    block runs: a world generator meanwhile (`mmembed data synth`, a run or a demo with other
    data.synth values) is refused instead of replacing the data under this run (a demo with a
    smaller world deleted the 6,000 scenes a running demo was training on). The world is checked
    again once the lock is held: a generator could start between the two."""
    from mmembed.data.synth.world_folder import matches, reading

    root, params = _prepare(data)
    with reading(root):
        if params is not None and not matches(root, params):
            raise UserError(f"data.root {root}: its synthetic world was replaced by another process as this run "
                            "started; start it again")
        _check_files(root, data)
        yield root


def captions(manifest: Path, root: Path | None = None, allow_outside_root: bool = False) -> Iterator[str]:
    """Every caption in a JSONL/CSV manifest's `text` (and `captions`, `qa`) columns; `root` and
    `allow_outside_root` as for training (a row refused there is refused here too)."""
    from mmembed.data import read_manifest

    yield from _texts(read_manifest(manifest, root=root, allow_outside_root=allow_outside_root).rows)


def _texts(rows) -> Iterator[str]:
    from mmembed.modality import Modality

    for row in rows:
        for value in [row.items.get(Modality.TEXT), *(row.meta.get("captions") or [])]:
            if isinstance(value, str):
                yield value
        qas = row.meta.get("qa")
        for qa in qas if isinstance(qas, list) else []:  # the world's {question, answer} pairs
            if isinstance(qa, dict):
                yield " ".join(str(qa[k]) for k in ("question", "answer") if isinstance(qa.get(k), str))
            elif isinstance(qa, str):  # a manifest's own `qa` column of another shape: its text
                yield qa


def read_train_manifest(cfg: Config, root: Path) -> Manifest:
    """data.train as the align stage trains on it (bad rows skipped, or refused with data.strict):
    read once and handed to `prepare_tokenizer` and the training loader (1M rows take ~30 s)."""
    from mmembed.data import read_manifest

    return read_manifest(root / cfg.data.train, root=root, allow_outside_root=cfg.data.allow_outside_root,
                         strict=cfg.data.strict)


def prepare_tokenizer(cfg: Config, root: Path, run_dir: Path | None, manifest: Manifest | None = None):
    """Load the configured tokenizer, reuse the run's own on resume, or train one on the
    training captions (vocabulary `tokenizer.vocab_size`). None when nothing needs one: no
    text tower, and no caption to train one on. `manifest`: data.train already read
    (`read_train_manifest`); else it is read here, unless the run's own tokenizer is reused."""
    from mmembed.data import read_manifest
    from mmembed.modality import Modality
    from mmembed.tokenizer import Tokenizer, load_tokenizer

    tok = cfg.tokenizer
    if run_dir is not None and (run_dir / "tokenizer.json").is_file():
        return load_tokenizer(run_dir / "tokenizer.json")
    # the data's own errors first: a tokenizer's, or advice about one, would hide them
    if manifest is None:
        manifest = read_manifest(root / cfg.data.train, root=root, allow_outside_root=cfg.data.allow_outside_root)
    has_text = next(_texts(manifest.rows), None) is not None  # the captions are listed only to train one
    check_trainable(cfg, manifest, has_text=has_text)
    if tok.kind == "clip":
        return load_tokenizer("clip")
    if tok.path is not None:
        if not Path(tok.path).exists():
            raise UserError(f"tokenizer.path not found: {tok.path}")
        return load_tokenizer(tok.path)
    if not has_text:  # no text tower, or a frozen one (check_trainable), whose run's tokenizer it needs
        if str(Modality.TEXT) in cfg.model.towers:
            raise UserError(f"no captions in {root / cfg.data.train} to train a tokenizer on: the frozen text tower "
                            "needs the tokenizer of the run it comes from (tokenizer.path=RUN/tokenizer.json)")
        return None
    texts = list(_texts(manifest.rows))
    log.info("training a %d-token BPE tokenizer on %d captions", tok.vocab_size, len(texts))
    return Tokenizer.train(texts, vocab_size=tok.vocab_size)


def check_trainable(cfg: Config, manifest, has_text: bool) -> None:
    """UserError unless some row of `manifest` pairs two of the towers' modalities, and, with a text
    tower that trains, unless some row has a caption (`has_text`): that tower would learn nothing. A
    frozen one (the bind-audio recipe: audio bound through images to a fixed space) needs none."""
    from mmembed.data import ManifestDataset
    from mmembed.data.columns import column_hints
    from mmembed.modality import Modality

    towers = {Modality(m) for m in cfg.model.towers if m in {str(v) for v in Modality}}  # others: the build's error
    if not any(len(towers & row.items.keys()) >= 2 for row in manifest.rows):
        # its error, once (the training loader gives its warnings); it reads which modalities the model
        # has, not their preprocessors, which need the tokenizer
        ManifestDataset(manifest, dict.fromkeys(towers)).check_pairs(captioned=cfg.loss.caption_weight > 0)
    if has_text or Modality.TEXT not in towers or cfg.model.towers[str(Modality.TEXT)].freeze:
        return
    hints = column_hints(manifest.meta_columns, {Modality.TEXT})
    rename = f" ({'; '.join(hints)}): rename the column, or" if hints else ":"
    also = " loss.caption_weight=0 and" if cfg.loss.caption_weight > 0 else ""
    raise UserError(f"{manifest.path}: no row has a caption (column text, captions or qa) for the text tower to "
                    f"learn from{rename} leave the text tower out with{also} model.towers.text=null")


def rows_fingerprint(manifest: Manifest) -> str:
    """sha256 of the rows a sampler permutes (their lines and items, in order; paths relative to
    the data root, so a run resumed where its data lies elsewhere still matches)."""
    item = _relative_to(manifest.root)
    digest = hashlib.sha256()
    for row in manifest.rows:
        digest.update(repr((row.line, sorted((str(m), item(v)) for m, v in row.items.items()))).encode())
    return digest.hexdigest()[:16]


def _relative_to(root) -> Callable[[object], str]:
    """str(value), relative to `root` when value is a Path under it, as Path.relative_to says.
    Path's own methods took ~15 µs an item (15 s for a million rows); a POSIX Path's string is
    already normalised (no '.', no doubled or trailing '/'), so a prefix test on the strings gives
    the same answer, except for POSIX's '//' anchor (not '/'), which goes Path's way."""
    def slow(value) -> str:
        return str(value.relative_to(root)) if isinstance(value, Path) and value.is_relative_to(root) else str(value)

    top = str(root) if isinstance(root, PurePosixPath) else ""
    if not top.startswith("/") or top.startswith("//"):  # relative, '//' or Windows: no read manifest's
        return slow
    prefix = top if top == "/" else top + "/"

    def fast(value) -> str:
        if not isinstance(value, Path):
            return str(value)
        text = str(value)
        if text.startswith("//") or not isinstance(value, PurePosixPath):
            return slow(value)
        if text == top:
            return "."
        return text[len(prefix):] if text.startswith(prefix) else text

    return fast
