"""Manifests from a folder of files, as clip-retrieval's folder reader and torchvision's ImageFolder
read one: no manifest to write by hand.

    photos/cat/0001.jpg  photos/cat/0001.wav  photos/cat/0001.txt   ->   one row
    {"image": "cat/0001.jpg", "audio": "cat/0001.wav", "text": "<what 0001.txt says>", "label": "cat"}

Files of one folder whose names differ only in their extension are one example: a picture (the
extensions of the formats an image tower opens by default), a sound (those soundfile decodes) and
a caption (`.txt`, UTF-8, stripped; with `caption_lines`, each non-empty line is a caption, the
first `text` and the others `captions`). With `labels="folder"` a row's label is its folder's path
under the scanned one (ImageFolder's classes), which makes `mmembed eval` match by class and
score zero-shot classification (files directly in the folder have none: counted). With `split`
the rows are dealt into train / val (/ test) manifests by the given fractions, exactly in all and
per label about so (`data.splits.deal`, seeded; many single-row labels can move a large one by a few rows).

What is not an example is skipped and counted, never guessed at: two pictures (or sounds, or
captions) of one name, a caption with no picture or sound of its name (a README.txt), a caption
file that is empty, unreadable, not UTF-8 or over `MAX_CAPTION_BYTES` (its picture or sound stays),
a broken link, a pipe or device, a path that is not UTF-8. Hidden files and
folders (`.git`, `.DS_Store`, `__MACOSX`) and manifests (`.jsonl`, `.csv`, `.tsv`) are passed over;
linked folders are not entered (counted). A split into two refuses a `test.jsonl` left in the
output folder by an earlier split into three, whatever `overwrite` says: it would share rows with
the new `train.jsonl`.
The manifest's paths are relative to the folder it is written in when the scanned folder lies
inside it (so it can be `data.root`), else absolute (`data.allow_outside_root=true` reads those).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmembed.checkpoint import atomic_write_text
from mmembed.data.columns import CAPTIONS_COLUMN, LABEL_COLUMN
from mmembed.data.manifest import MANIFEST_SUFFIXES
from mmembed.data.splits import deal
from mmembed.errors import UserError
from mmembed.modality import Modality

MAX_CAPTION_BYTES = 1 << 20  # a larger .txt is a document, not a caption
SPLIT_NAMES = ("train", "val", "test")
UNSPLIT_NAME = "manifest.jsonl"
_HIDDEN_FOLDERS = {"__MACOSX"}  # macOS zip archives' resource forks
# soundfile's format names of the extensions read as sounds (those the installed libsndfile lacks are not)
_AUDIO_EXTENSIONS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".opus": "OGG", ".mp3": "MP3",
                     ".aif": "AIFF", ".aiff": "AIFF", ".au": "AU", ".caf": "CAF", ".w64": "W64"}
_CAPTION_EXTENSIONS = (".txt",)
_KEY_ORDER = (Modality.IMAGE.value, Modality.AUDIO.value, Modality.TEXT.value, CAPTIONS_COLUMN, LABEL_COLUMN)


def media_extensions() -> dict[str, Modality]:
    """Lower-case extension -> modality, for the files a folder scan reads."""
    import soundfile as sf
    from PIL import Image

    from mmembed.preprocess.image_decode import DEFAULT_FORMATS

    found = {ext: Modality.IMAGE for ext, fmt in Image.registered_extensions().items() if fmt in DEFAULT_FORMATS}
    readable = sf.available_formats()
    found |= {ext: Modality.AUDIO for ext, fmt in _AUDIO_EXTENSIONS.items() if fmt in readable}
    return found | {ext: Modality.TEXT for ext in _CAPTION_EXTENSIONS}


@dataclass
class FolderManifests:
    """What `write_folder_manifests` wrote: each manifest's path and rows, the items by modality,
    and every skip by reason with a first example."""

    files: dict[str, Path]  # manifest name ("train", "val", "test", or "manifest") -> path written
    rows: dict[str, int]
    items: dict[Modality, int]
    labels: int  # distinct labels (0 without labels="folder")
    unlabelled: int  # with labels="folder": rows of files directly in the folder, which have no label
    absolute: bool  # paths written absolute: the scanned folder is not inside the manifests' folder
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, str] = field(default_factory=dict)  # reason -> the first path it was given for

    def skipped_line(self) -> str:
        """'captions without a picture or sound of their name: 2 (e.g. README.txt); ...', or ''."""
        return _skipped_line(self)


def _skipped_line(counts: Any) -> str:
    """A `FolderManifests`' or a scan's skips as one line."""
    return "; ".join(f"{reason}: {n} (e.g. {counts.examples[reason]})" for reason, n in counts.skipped.items())


@dataclass
class _Scan:
    groups: dict[tuple[str, str], dict[Modality, list[Path]]]  # (folder, stem) -> its files by modality
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, example: Path | str) -> None:
        self.skipped[reason] += 1
        name = str(example)
        self.examples.setdefault(reason, name if name.isprintable() else ascii(name))  # a newline in a name


def scan_folder(folder: Path) -> _Scan:
    """Every non-hidden file under `folder`, grouped by (its folder, its name without extension)."""
    kinds = media_extensions()
    scan = _Scan(groups={})

    def unreadable(error: OSError) -> None:
        where = Path(error.filename or folder)
        scan.skip("unreadable folders", where.relative_to(folder) if where.is_relative_to(folder) else where)

    for here, folders, files in os.walk(folder, onerror=unreadable):
        base = Path(here)
        for name in list(folders):
            if name.startswith(".") or name in _HIDDEN_FOLDERS:
                folders.remove(name)
            elif (base / name).is_symlink():
                folders.remove(name)
                scan.skip("linked folders not entered", (base / name).relative_to(folder))
        folders.sort()
        rel = base.relative_to(folder).as_posix()
        for name in sorted(files):
            if name.startswith(".") or Path(name).suffix.lower() in MANIFEST_SUFFIXES:  # hidden, or a manifest
                continue
            path = base / name
            kind = kinds.get(path.suffix.lower())
            if not _utf8(str(path.relative_to(folder))):  # undecodable bytes in a name: no manifest can hold it
                scan.skip("files whose path is not UTF-8", path.relative_to(folder))
            elif kind is None:
                scan.skip(f"files of another type ({path.suffix.lower() or 'no extension'})", path.relative_to(folder))
            elif not path.exists():
                scan.skip("broken links", path.relative_to(folder))
            elif not path.is_file():  # a pipe or a device: reading it could wait forever
                scan.skip("entries that are not regular files", path.relative_to(folder))
            else:
                scan.groups.setdefault((rel, path.stem), {}).setdefault(kind, []).append(path)
    return scan


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _caption(path: Path, lines: bool) -> tuple[list[str], str | None]:
    """The captions a .txt holds, or the reason it holds none."""
    try:
        if path.stat().st_size > MAX_CAPTION_BYTES:
            return [], f"caption files over {MAX_CAPTION_BYTES >> 20} MB"
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return [], "caption files not in UTF-8"
    except OSError:  # no permission, or gone since the scan
        return [], "unreadable caption files"
    found = [line.strip() for line in text.splitlines()] if lines else [text.strip()]
    found = list(dict.fromkeys(c for c in found if c))  # order kept, duplicates dropped
    return found, (None if found else "empty caption files")


def _rows(scan: _Scan, folder: Path, out_dir: Path, absolute: bool, labels: bool, caption_lines: bool
          ) -> list[dict[str, Any]]:
    rows = []
    for (rel, _), files in scan.groups.items():
        doubled = [m for m, paths in files.items() if len(paths) > 1]
        if doubled:
            names = ", ".join(p.relative_to(folder).as_posix() for p in files[doubled[0]])
            scan.skip(f"examples with two files of one kind ({doubled[0]})", names)
            continue
        media = {m: paths[0] for m, paths in files.items() if m != Modality.TEXT}
        if not media:
            scan.skip("captions without a picture or sound of their name", files[Modality.TEXT][0].relative_to(folder))
            continue
        row: dict[str, Any] = {m.value: (p if absolute else p.relative_to(out_dir)).as_posix()  # links kept
                               for m, p in media.items()}
        if Modality.TEXT in files:
            captions, why = _caption(files[Modality.TEXT][0], caption_lines)
            if why is not None:  # the picture or sound stays, without a caption
                scan.skip(why, files[Modality.TEXT][0].relative_to(folder))
            elif captions:
                row[Modality.TEXT.value] = captions[0]
                if captions[1:]:
                    row[CAPTIONS_COLUMN] = captions[1:]
        if labels and rel != ".":
            row[LABEL_COLUMN] = rel
        rows.append({k: row[k] for k in _KEY_ORDER if k in row})
    return rows


def check_fractions(split: Sequence[float]) -> tuple[float, ...]:
    """Two or three fractions (train, val[, test]), each in [0, 1], train > 0, summing to 1."""
    fractions = tuple(float(f) for f in split)
    if not 2 <= len(fractions) <= 3:
        raise UserError(f"split: give 2 or 3 fractions (train, val[, test]), got {len(fractions)}")
    if any(not 0 <= f <= 1 for f in fractions) or fractions[0] == 0:
        raise UserError(f"split: each fraction must lie in [0, 1] and train's be above 0, got {list(fractions)}")
    if abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"split: the fractions must sum to 1, got {sum(fractions):g}")
    return fractions


def split_rows(rows: list[dict[str, Any]], fractions: Sequence[float], seed: int) -> list[list[dict[str, Any]]]:
    """`rows` dealt into len(fractions) parts per label (rows without one are one group; `splits.deal`),
    every part in the rows' own order."""
    return [[rows[i] for i in part] for part in deal([r.get(LABEL_COLUMN, "") for r in rows], fractions, seed)]


def write_folder_manifests(folder: str | Path, *, out_dir: str | Path | None = None,
                           split: Sequence[float] | None = None, seed: int = 0,
                           labels: Literal["none", "folder"] = "none", caption_lines: bool = False,
                           overwrite: bool = False) -> FolderManifests:
    """Scan `folder` (see the module docstring) and write `manifest.jsonl`, or with `split`
    `train.jsonl`, `val.jsonl` (and `test.jsonl`), into `out_dir` (default: `folder`).

    A user mistake (no such folder, bad fractions, a manifest already there without `overwrite`,
    nothing to write, a split left empty) is a UserError before any file is written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder" if folder.exists() else f"folder not found: {folder}")
    if labels not in ("none", "folder"):
        raise UserError(f"labels must be 'none' or 'folder', got {labels!r}")
    fractions = check_fractions(split) if split is not None else None
    folder = folder.resolve()
    out = Path(out_dir).resolve() if out_dir is not None else folder
    names = [f"{n}.jsonl" for n in SPLIT_NAMES[:len(fractions)]] if fractions else [UNSPLIT_NAME]
    targets = [out / n for n in names]
    there = [t for t in targets if t.exists()]
    if there and not overwrite:
        raise UserError(f"{there[0]} exists: pass --overwrite (overwrite=True) to replace it")
    # a test.jsonl of an earlier 3-way split beside a new 2-way one would share rows with the new train.jsonl
    stale = [out / f"{n}.jsonl" for n in SPLIT_NAMES[len(names):]] if fractions else []
    if stale := [p for p in stale if p.exists()]:
        raise UserError(f"{stale[0]} is there, from another split, and would share rows with the new manifests: "
                        "delete it, or split three ways")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    absolute = not (out == folder or out in folder.parents)
    written = folder if absolute else folder.relative_to(out)  # what the manifests' paths start with
    if not _utf8(str(written)):
        raise UserError(f"{ascii(str(folder))}: the folder's path is not UTF-8, which no manifest can hold; write the "
                        "manifests inside it (no --out) to keep its paths relative")

    scan = scan_folder(folder)
    rows = _rows(scan, folder, out, absolute, labels == "folder", caption_lines)
    if not rows:
        skipped = f"; skipped: {_skipped_line(scan)}" if scan.skipped else ""
        if any(m != Modality.TEXT for files in scan.groups.values() for m in files):  # found, none an example
            raise UserError(f"no example in {folder}: every picture or sound was skipped{skipped}")
        wanted = ", ".join(sorted(e for e, m in media_extensions().items() if m != Modality.TEXT))
        raise UserError(f"no picture or sound in {folder} (looked for {wanted}, and .txt captions beside them)"
                        f"{skipped}")
    parts = split_rows(rows, fractions, seed) if fractions else [rows]
    empty = [n for n, part in zip(names, parts) if not part]
    if empty:
        raise UserError(f"split {list(fractions or ())} leaves {empty[0]} empty ({len(rows)} rows): give it a larger "
                        "fraction, or split fewer ways")
    for target, part in zip(targets, parts):
        atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    items = Counter(Modality(k) for r in rows for k in r if k in {m.value for m in Modality})
    return FolderManifests(files={t.stem: t for t in targets}, rows={t.stem: len(p) for t, p in zip(targets, parts)},
                           items={m: items[m] for m in Modality}, absolute=absolute,
                           labels=len({r[LABEL_COLUMN] for r in rows if LABEL_COLUMN in r}),
                           unlabelled=sum(LABEL_COLUMN not in r for r in rows) if labels == "folder" else 0,
                           skipped=scan.skipped, examples=scan.examples)
