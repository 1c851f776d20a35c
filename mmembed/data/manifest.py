"""Manifests: the on-disk format of every dataset (JSONL, or CSV/TSV with a header).

One row per example with any subset of the modality columns (`image`, `audio`, `text`) plus
free metadata; a `label` column is the example's identity for evaluation and label-aware
losses. Captions are stored inline; every other modality is a file path, relative to the
manifest's folder (or `root`).

    {"image": "img/0001.png", "audio": "wav/0001.wav", "text": "a red circle", "label": "s1"}

Several captions: a JSONL row may add `captions`, a list of alternative captions for the same
media. The primary `text` is what evaluation and indexing use; training may sample one caption
per epoch from the pool `(text, *captions)` (see `ManifestDataset`). The pool is validated here,
so a row's skip never depends on which caption an epoch draws: `captions` must be a list of
non-empty strings and needs a `text` (an empty `text` is a bad item, as anywhere, and the row is
skipped in every epoch); duplicates (of `text` or of each other) are dropped. CSV cannot hold a list: there, as in JSONL, the same media may instead repeat on
several rows, one caption each (give them the same `label`).

    {"image": "img/0001.png", "text": "a red circle", "captions": ["a circle in red", "red round shape"]}

Absent values: a missing key or `null` in JSONL, an empty cell in CSV (CSV cannot say null).
An empty JSON string is a present-but-empty value, which preprocessing rejects.

Safety: a path that is absolute or escapes the root through `..` is refused unless
`allow_outside_root`. The check is lexical (normalised path, symlinks not followed): a dataset
folder may legitimately hold symlinks (the Hugging Face cache is built from them), while a
manifest naming `/etc/passwd` or `../../secrets` is what the rule exists to stop.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmembed.data.columns import CAPTIONS_COLUMN, LABEL_COLUMN, column_hints
from mmembed.errors import UserError
from mmembed.gc_pause import collector_paused
from mmembed.modality import Modality
from mmembed.text_encoding import SURROGATE

# modalities whose manifest value is the content itself; all others are file paths
INLINE_MODALITIES = frozenset({Modality.TEXT})
# the modality of the alternative captions (`CAPTIONS_COLUMN`) of the row's media
CAPTION_MODALITY = Modality.TEXT
# no ".json": a JSON array file would be misread line by line; one object per line is the format
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
MANIFEST_SUFFIXES = frozenset(_FORMATS)
# byte-order marks of the encodings a spreadsheet's "Unicode text" export writes (UTF-32 first: FF FE 00 00 starts with FF FE)
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
         (b"\xfe\xff", "UTF-16"))


@dataclass(frozen=True)
class Row:
    """One example. `items` maps each modality the row has to a caption or an absolute Path.

    `captions` holds the row's alternative captions, validated and without duplicates: never
    the primary `items[CAPTION_MODALITY]`, empty when the row gives none. `meta` keeps every
    other column as read (the raw `captions` list included, for readers of metadata).
    """

    line: int  # 1-based line of the manifest file (for CSV: the line the record ends on)
    items: dict[Modality, str | Path]
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    captions: tuple[str, ...] = ()

    @property
    def caption_pool(self) -> tuple[str, ...]:
        """The primary caption then the alternatives; () when the row has no caption."""
        primary = self.items.get(CAPTION_MODALITY)
        return () if primary is None else (str(primary), *self.captions)


@dataclass
class Manifest:
    """The readable rows of a manifest and the (line, reason) of every row that was not."""

    path: Path
    root: Path
    rows: list[Row]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    skipped_items: list[tuple[int, Modality, str]] = field(default_factory=list)  # (line, modality, reason)

    @property
    def meta_columns(self) -> set[str]:
        """The columns read as metadata (every column not a modality nor `label`)."""
        return {k for row in self.rows for k in row.meta}

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """Modalities present in at least one row, in `Modality` order."""
        seen = {m for row in self.rows for m in row.items}
        return tuple(m for m in Modality if m in seen)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


class BadRow(Exception):
    """A row that cannot be used; skipped and counted, or raised in strict mode."""


@collector_paused()  # rows of dicts and lists, many of them: gc_pause.py
def read_manifest(
    path: str | Path,
    *,
    root: str | Path | None = None,
    allow_outside_root: bool = False,
    strict: bool = False,
    bad_items: Literal["row", "item"] = "row",
) -> Manifest:
    """Read a JSONL or CSV/TSV manifest.

    Args:
        path: the manifest file; the suffix picks the format (.jsonl/.ndjson, .csv, .tsv).
        root: folder that relative paths resolve against (default: the manifest's folder).
        allow_outside_root: accept absolute paths and paths escaping `root` through `..`.
        strict: raise on the first bad row instead of skipping and counting it.
        bad_items: "row": a row with a refused item (a path outside the root, a value that is not a
            string) is skipped whole, as training reads it; "item": only that item is, counted in
            `skipped_items` (an index keeps the row's other items). A row with no good item is
            skipped either way.

    Returns:
        A `Manifest`. Raises UserError (naming the file, and the line for row errors) when the
        file is missing, has an unknown format, has no modality column, or has no usable row.
    """
    path = Path(path)
    check_file(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown manifest format {path.suffix!r} (use {', '.join(_FORMATS)})")
    check_utf8ish(path)
    base = Path(os.path.abspath(root if root is not None else path.parent))
    records = read_jsonl_records(path) if fmt == "jsonl" else _read_csv(path, "\t" if fmt == "tsv" else ",")
    rows: list[Row] = []
    skipped: list[tuple[int, str]] = []
    skipped_items: list[tuple[int, Modality, str]] = []
    seen_columns: set[str] = set()
    for line, record in records:
        refused: list[tuple[Modality, str]] | None = [] if bad_items == "item" and not strict else None
        try:
            if isinstance(record, BadRow):
                raise record
            seen_columns.update(record)
            rows.append(_make_row(line, record, base, allow_outside_root, refused))
            skipped_items += [(line, m, reason) for m, reason in refused or ()]
        except BadRow as e:
            if strict:
                raise UserError(f"{path}:{line}: {e}") from None
            skipped.append((line, str(e)))
    _check_columns(path, seen_columns, rows, skipped)
    return Manifest(path=path, root=base, rows=rows, skipped=skipped, skipped_items=skipped_items)


def _check_columns(path: Path, columns: set[str], rows: list[Row], skipped: list[tuple[int, str]]) -> None:
    if not rows and not skipped:
        raise UserError(f"{path}: manifest is empty")
    _check_modality_columns(path, columns)
    if not rows:
        line, reason = skipped[0]
        raise UserError(f"{path}: no usable row ({len(skipped)} skipped; first, line {line}: {reason})")


def check_file(path: Path, what: str = "manifest") -> None:
    """UserError for a manifest path that names a folder or nothing."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")


def check_utf8ish(path: Path, what: str = "manifest") -> None:
    """UserError for a UTF-16/32 file (a manifest, or `what` else): read as UTF-8 its columns are names full of NULs, its lines
    all invalid. Without a byte-order mark, its NULs give it away: one byte in two or more (ASCII
    text in UTF-16); a stray NUL in a UTF-8 file is one bad line, skipped as such."""
    with path.open("rb") as f:
        head = f.read(256)
    encoding = next((name for bom, name in _BOMS if head.startswith(bom)), None)
    if encoding is None and b"\x00" in head and head.count(b"\x00") >= len(head) // 4:
        encoding = "UTF-16 or UTF-32 (it holds NUL bytes)"
    if encoding is not None:
        raise UserError(f"{path}: {what} is {encoding}: save it as UTF-8")


def _check_modality_columns(path: Path, columns: set[str]) -> None:
    known = [m.value for m in Modality]
    if columns and not columns & set(known):
        found = ", ".join(c if c.isprintable() else ascii(c) for c in sorted(columns))
        hints = "".join(f"; {hint}" for hint in column_hints(columns, set(Modality)))
        raise UserError(f"{path}: no modality column (need at least one of {', '.join(known)}; found {found}){hints}")


def _make_row(line: int, record: dict[str, Any], base: Path, allow_outside_root: bool,
              refused: list[tuple[Modality, str]] | None = None) -> Row:
    """One record → a Row; BadRow when it cannot be used. With `refused` (a list), an item that is
    refused alone is appended to it instead, and the row keeps its other items."""
    items: dict[Modality, str | Path] = {}
    meta: dict[str, Any] = {}
    label = None
    for key, value in record.items():
        if key == LABEL_COLUMN:
            label = None if value in (None, "") else str(value)
            continue
        try:
            modality = Modality(key)
        except ValueError:
            meta[key] = value
            continue
        if value is None:
            continue
        try:
            if not isinstance(value, str):
                raise BadRow(f"{key} must be a string, got {type(value).__name__}")
            items[modality] = value if modality in INLINE_MODALITIES else resolve_path(value, base, allow_outside_root)
        except BadRow as e:
            if refused is None:
                raise
            refused.append((modality, str(e)))
    if not items:
        raise BadRow(refused[0][1] if refused else f"no value in any modality column "
                     f"({', '.join(m.value for m in Modality)})")
    caption_refused = refused is not None and any(m == CAPTION_MODALITY for m, _ in refused)
    # a refused caption takes its alternatives with it (they stand beside a primary caption)
    captions = () if caption_refused else _alternative_captions(record.get(CAPTIONS_COLUMN), items.get(CAPTION_MODALITY))
    return Row(line=line, items=items, label=label, meta=meta, captions=captions)


def _alternative_captions(value: Any, primary: str | Path | None) -> tuple[str, ...]:
    """The `captions` column → alternatives to `primary`, deduplicated; BadRow if malformed."""
    if value is None:
        return ()
    if not isinstance(value, list):
        hint = " (CSV cannot hold a list: repeat the row once per caption)" if isinstance(value, str) else ""
        raise BadRow(f"{CAPTIONS_COLUMN} must be a list of strings, got {type(value).__name__}{hint}")
    for i, caption in enumerate(value):
        if not isinstance(caption, str):
            raise BadRow(f"{CAPTIONS_COLUMN}[{i}] must be a string, got {type(caption).__name__}")
        if not caption.strip():
            raise BadRow(f"{CAPTIONS_COLUMN}[{i}] is an empty caption")
        if SURROGATE.search(caption):  # "\udfff" in JSON is no text: refused here, whichever caption an epoch draws
            raise BadRow(f"{CAPTIONS_COLUMN}[{i}] holds a lone surrogate, which is not Unicode text")
    if not value:
        return ()
    if primary is None:
        raise BadRow(f"{CAPTIONS_COLUMN} given without {CAPTION_MODALITY} (the primary caption evaluation uses)")
    if not str(primary).strip():
        # an empty primary makes the row bad, as anywhere: preprocessing skips it every epoch,
        # which it would not if an epoch could draw an alternative instead
        return ()
    seen = {str(primary).strip()}
    unique = []
    for caption in value:
        if caption.strip() not in seen:
            seen.add(caption.strip())
            unique.append(caption)
    return tuple(unique)


def check_unicode(text: str, what: str) -> None:
    """A lone surrogate (a JSON "\\udfff") is no text and cannot be tokenised: BadRow, so the row
    is skipped and counted (or its file and line named) where it is read, not deep in a run."""
    if m := SURROGATE.search(text):
        raise BadRow(f"{what} is not valid Unicode (lone surrogate U+{ord(m.group()):04X})")


def resolve_path(value: str, base: Path, allow_outside_root: bool) -> Path:
    """Relative path → absolute normalised path under `base` (or refused). String operations, one
    Path at the end: with a Path per step, 57k instruction rows took 5 s to resolve."""
    if not value.strip():
        raise BadRow("empty path")
    if allow_outside_root:
        try:
            value = str(Path(value).expanduser())
        except RuntimeError:  # "~name/..." for a user this machine does not have
            raise BadRow(f"cannot expand {value!r}: no such user's home folder") from None
    elif os.path.isabs(value):
        raise BadRow(f"absolute path {value!r} refused (set allow_outside_root to accept it)")
    root = str(base)
    resolved = os.path.normpath(os.path.join(root, value))
    # compared as absolute paths: under a relative base (`.`) "a.png" does not start with "./"
    whole, where = (resolved, root) if os.path.isabs(root) else (os.path.abspath(resolved), os.path.abspath(root))
    inside = where if where.endswith(os.sep) else where + os.sep
    if not allow_outside_root and whole != where and not whole.startswith(inside):
        raise BadRow(f"path {value!r} escapes the data root {base} (set allow_outside_root to accept it)")
    return Path(resolved)


def read_jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield line, BadRow(f"invalid UTF-8 at byte {e.start}")
                continue
            if not text.strip():
                continue  # blank lines (a trailing newline, a separator) are not rows
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                # json's "Invalid control character at" ends in its own "at"
                yield line, BadRow(f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
                continue
            except RecursionError:
                yield line, BadRow("invalid JSON (nested too deeply)")
                continue
            yield line, record if isinstance(record, dict) else BadRow(
                f"a row must be a JSON object, got {type(record).__name__}"
            )


def _cell(column: str, value: str) -> str | None:
    if column != CAPTION_MODALITY.value:
        value = value.strip()
    return value if value != "" else None


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogateescape keeps them


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    csv.field_size_limit(sys.maxsize)  # a long caption is truncated by the tokenizer, as in JSONL
    reader, done = None, 0  # done: lines of the records read whole; the next one starts after them
    try:
        # undecodable bytes are kept as surrogates and refuse their own row, naming its line
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            # strict: an unclosed quote is an error at its line, not the rest of the file as one cell.
            # A CSV may put a space after each comma ("text, image"), which is no part of the cell
            spaced = {"skipinitialspace": True} if delimiter == "," else {}
            reader = csv.reader(f, delimiter=delimiter, strict=True, **spaced)
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            if not any(header):
                raise UserError(f"{path}: the header (line 1) is empty: the first line must name the columns")
            if len(set(header)) != len(header):
                raise UserError(f"{path}: duplicate column names in the header {header}")
            _check_modality_columns(path, set(header))
            done = reader.line_num
            for cells in reader:
                # a record's line is the one it starts on (a quoted caption may run over several;
                # `line_num` is where it ends, and rows were named by their last line)
                start, done = done + 1, reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    yield start, BadRow(f"{len(cells)} cells for {len(header)} columns")
                    continue
                if any(_UNDECODABLE.search(c) for c in cells):
                    yield start, BadRow("invalid UTF-8")
                    continue
                # CSV has no null: an empty cell is an absent value; a path or label ends where its
                # text does ("a.png " is a.png), a caption keeps its own spaces
                yield start, {k: _cell(k, v) for k, v in zip(header, cells)}
    except csv.Error as e:
        # an unclosed quote fails where the file ends: name the line its record starts at
        start = done + 1
        where = f":{start}" if reader is not None else ""
        spans = reader is not None and reader.line_num > start
        at = f" at line {reader.line_num}, in the record starting at line {start}" if spans else ""
        raise UserError(f"{path}{where}: malformed CSV ({e}{at}): a cell that starts with a quote is a quoted "
                        'field, with "" for each quote inside ("""Hello"" she said")') from None
