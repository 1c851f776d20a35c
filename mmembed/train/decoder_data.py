"""Decoder training data: instruction rows → fused-sequence batches over a frozen shared space.

    rows ─► MediaTable: every distinct media item embedded once by the frozen towers ─► (U, D)
         ─► PromptDataset: ids = prompt (text tokens, markers, placeholders) + answer + <eos>
         ─► collate: right-padded ids, next-token targets, answer-only loss mask, media indices
            (or pack: the batch's prompts packed into rows of the context, each attending to itself)

With the space frozen a media item's vector never changes, so it is computed once rather than
every epoch; a step then costs only the projector and the decoder.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmembed.data.instructions import InstructionRow, MediaRef
from mmembed.decoder.prompt import VECTOR, PromptFormat, join_text
from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality

class MediaTable:
    """The distinct media items of some rows, and their shared-space vectors once embedded."""

    def __init__(self) -> None:
        self.index: dict[MediaRef, int] = {}
        self.vectors: Tensor | None = None
        self.bad: dict[MediaRef, str] = {}

    def add(self, rows: list[InstructionRow]) -> None:
        self.add_refs(ref for row in rows for ref in row.media)

    def add_refs(self, refs: Iterable[MediaRef]) -> None:
        for ref in refs:
            self.index.setdefault(ref, len(self.index))

    def good_vectors(self) -> Tensor:
        """(N, D) the vectors of the readable items (none before `embed`)."""
        if self.vectors is None:
            return torch.zeros(0, 0)
        return self.vectors[[i for ref, i in self.index.items() if ref not in self.bad]]

    def embed(self, model: Any, batch_size: int = 256) -> None:
        """Embed every item with `model.embed` (a `Model`); unreadable ones are recorded in `bad`."""
        vectors = torch.zeros(len(self.index), model.embed_dim)
        by_modality: dict[Modality, list[MediaRef]] = {}
        for ref in self.index:
            by_modality.setdefault(ref[0], []).append(ref)
        for modality, refs in by_modality.items():
            for start in range(0, len(refs), batch_size):
                chunk = refs[start:start + batch_size]
                try:
                    z = model.embed(modality, [item for _, item in chunk], batch_size=batch_size)
                    vectors[[self.index[r] for r in chunk]] = z
                except BadInput:  # find the bad items one by one; the rest of the chunk still counts
                    for ref in chunk:
                        try:
                            vectors[self.index[ref]] = model.embed(modality, [ref[1]])[0]
                        except BadInput as e:
                            self.bad[ref] = f"{modality}: {item_reason(e)}"
        self.vectors = vectors

    def refuse_bad(self, rows: list[InstructionRow], path: Path) -> None:
        """strict mode: the first of `rows` with an unreadable media item → UserError naming the
        manifest and the line, as a bad row of it is named."""
        for row in rows:
            bad = [self.bad[r] for r in row.media if r in self.bad]
            if bad:
                raise UserError(f"{path}:{row.line}: {bad[0]}")


def item_reason(e: BadInput) -> str:
    """A `model.embed` error without its "image item 0: " prefix: an item embedded alone is always
    item 0, which named no row."""
    return re.sub(r"^\w+ item \d+: ", "", str(e))


@dataclass
class Encoded:
    """One row as ids: prompt pieces (text ids, or a media marker + table index) and the answer."""

    pieces: list[list[int] | tuple[str, int]]
    answer: list[int]


Item = tuple[list[int], int, list[int]]  # a prompt: (ids, index of the first answer id, media table indices)


class PromptDataset(Dataset):
    """Rows → (ids, answer start, media indices), with each media marker drawn per sample.

    Args:
        rows: instruction rows whose media are all in `table` and readable.
        fmt: the prompt format (tokenizer, markers, soft tokens).
        table: where each media item's vector is.
        context: longest sequence the decoder takes; longer rows are skipped.
        vector_marker_prob: chance of marking an item `<vector>` instead of its modality (training).
        what: the rows as an error names them (which manifest).
    """

    def __init__(self, rows: list[InstructionRow], fmt: PromptFormat, table: MediaTable, context: int,
                 vector_marker_prob: float = 0.0, what: str = "instruction rows") -> None:
        self.fmt, self.table, self.vector_marker_prob = fmt, table, vector_marker_prob
        self.examples: list[Encoded] = []
        self.skipped: list[tuple[int, str]] = []
        self._digest = hashlib.sha256()  # of the rows kept, in order (`fingerprint`)
        for row in rows:
            bad = [table.bad[r] for r in row.media if r in table.bad]
            if bad:
                self.skipped.append((row.line, bad[0]))
                continue
            enc = self._encode(row)
            if self._length(enc) > context:
                self.skipped.append((row.line, f"{self._length(enc)} tokens exceed the context of {context}"))
                continue
            self.examples.append(enc)
            self._digest.update(repr((row.line, row.answer, [seg if isinstance(seg, str) else (str(seg[0]), Path(
                seg[1]).name) for seg in row.prompt])).encode())
        if not self.examples:
            first = f" (first: line {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ""
            raise UserError(f"no usable {what}{first}")

    def _encode(self, row: InstructionRow) -> Encoded:
        pieces: list[list[int] | tuple[str, int]] = []
        for seg in join_text(row.prompt):  # adjacent text segments as one text, as `PromptFormat.encode` reads them
            if isinstance(seg, str):
                pieces.append(self.fmt.tokenizer.encode(seg))
            else:
                pieces.append((seg[0].value, self.table.index[seg]))
        return Encoded(pieces, self.fmt.encode_answer(row.answer))

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """sha256 of the rows kept, in order (lines, answers, prompt words and media file names):
        what a resumed run checks its rows against."""
        return self._digest.hexdigest()[:16]

    def media_vectors(self) -> Tensor:
        """(N, D) the table's vectors of the media these examples show, each once."""
        used = {p[1] for ex in self.examples for p in ex.pieces if isinstance(p, tuple)}
        return self.table.vectors[sorted(used)]

    def _length(self, ex: Encoded) -> int:
        """<bos> + prompt pieces (a media item: its markers and soft tokens) + <answer> + answer."""
        media = self.fmt.soft_tokens + 2
        return 2 + len(ex.answer) + sum(len(p) if isinstance(p, list) else media for p in ex.pieces)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        """(index, sample seed) → (ids, index of the first answer id, media table indices)."""
        index, seed = key
        ex = self.examples[index]
        rng = random.Random(seed)
        fmt = self.fmt
        ids, media = [fmt.bos_id], []
        for piece in ex.pieces:
            if isinstance(piece, list):
                ids += piece
                continue
            marker = VECTOR if self.vector_marker_prob and rng.random() < self.vector_marker_prob else piece[0]
            ids += fmt.slot_ids(marker)
            media.append(piece[1])
        ids.append(fmt.answer_id)
        return ids + ex.answer, len(ids), media


@dataclass
class PromptBatch:
    ids: Tensor  # (R, T) right-padded rows: one prompt each, or several when packed
    targets: Tensor  # (R, T) next id at each position
    loss_mask: Tensor  # (R, T) bool: the next id belongs to the answer
    media: Tensor  # (M,) table indices, row-major
    prompts: int  # prompts in the batch (R unless packed)
    mask: Tensor | None = None  # packed: (R, T, T) bool, True where a token may see a key of its own prompt
    positions: Tensor | None = None  # packed: (R, T) each prompt's positions, from 0

    def to(self, device: torch.device) -> PromptBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return PromptBatch(move(self.ids), move(self.targets), move(self.loss_mask), move(self.media), self.prompts,
                           move(self.mask), move(self.positions))

    def __len__(self) -> int:
        return self.prompts


def collate_prompts(items: list[Item], pad_id: int) -> PromptBatch:
    """One prompt per row, right-padded to the longest."""
    return _lay_out([[item] for item in items], pad_id, packed=False)


def pack_prompts(items: list[Item], pad_id: int, context: int) -> PromptBatch:
    """The batch's prompts packed into as few rows of `context` tokens as first-fit decreasing
    finds (torchtune's packing, within one batch). The mask keeps each prompt to its own tokens
    and its positions restart at 0, so every prompt gets exactly the logits it gets alone: the
    batch and its loss stay what they were, without the padding. On the demo's prompts (mean 35
    tokens, a batch's longest 82 on average) that is under half of the padded batch's tokens."""
    rows: list[list[Item]] = []
    room: list[int] = []
    for item in sorted(items, key=lambda it: -len(it[0])):  # stable: ties keep the batch's order
        n = len(item[0])
        if n > context:
            raise ValueError(f"a prompt of {n} tokens does not fit the context of {context}")
        free = next((r for r, left in enumerate(room) if n <= left), None)
        if free is None:
            rows.append([item])
            room.append(context - n)
        else:
            rows[free].append(item)
            room[free] -= n
    return _lay_out(rows, pad_id, packed=True)


def _lay_out(rows: list[list[Item]], pad_id: int, packed: bool) -> PromptBatch:
    width = max(sum(len(ids) for ids, _, _ in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    prompt_of = torch.full((len(rows), width), -1, dtype=torch.long)  # which prompt of its row a token is; -1 = pad
    media: list[int] = []
    for r, row in enumerate(rows):
        start = 0
        for p, (seq, answer_start, ms) in enumerate(row):
            end = start + len(seq)
            ids[r, start:end] = torch.tensor(seq)
            loss_mask[r, start + answer_start - 1 : end - 1] = True  # positions that predict an answer id
            positions[r, start:end] = torch.arange(len(seq))
            prompt_of[r, start:end] = p
            media += ms
            start = end
    targets = torch.full_like(ids, pad_id)
    targets[:, :-1] = ids[:, 1:]  # a prompt's last position would read the next one's first id: never in the loss
    n_prompts = sum(len(row) for row in rows)
    if not packed:
        return PromptBatch(ids, targets, loss_mask, torch.tensor(media, dtype=torch.long), n_prompts)
    mask = (prompt_of[:, :, None] == prompt_of[:, None, :]) & (prompt_of >= 0)[:, None, :]
    return PromptBatch(ids, targets, loss_mask, torch.tensor(media, dtype=torch.long), n_prompts, mask, positions)
