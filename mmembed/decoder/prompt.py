"""Prompts: segments of text and media, and how they become decoder ids.

A prompt is a `str`, or a sequence of segments in any order:

    str                       text the user typed (tokenised)
    Image(path | PIL | array) a picture       ─┐
    Audio(path | (wave, sr))  a sound          ├─ embedded by the model's tower → one vector
    Text("a caption")         a caption        ─┘  (through the text tower, not tokenised)
    Embedded(z, modality)     an item already embedded (a recalled memory): its modality's markers
    Tensor (D,)               a shared-space vector from anywhere (an index, a composed query)

Layout of the ids (`PromptFormat.encode`):

    <bos> text … <image> ▢ … ▢ </image> text … <audio> ▢ … ▢ </audio> … <answer>  →  answer … <eos>

where ▢ is the placeholder (`<media>`) the projector's k soft tokens replace. A bare vector is
wrapped in `<vector> … </vector>`. Markers are special ids that no typed text can produce: a
user who types "<image>" gets those seven characters as text. Markers the tokenizer lacks
(all of them for GPT-2's) get ids after its vocabulary; the decoder's embedding has rows for them.
Text segments are stripped at their ends: a media item is a word boundary, so
`"Describe ", Image(...)` and `"Describe", Image(...)` are the same prompt.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.preprocess.files import normalisation_hint
from mmembed.text_encoding import SURROGATE

VECTOR = "vector"  # marker name for a bare shared-space vector


class Media:
    """A media item in a prompt; `Image`, `Audio` and `Text` fix the modality."""

    modality: ClassVar[Modality]

    def __init__(self, item: Any) -> None:
        self.item = item

    def __repr__(self) -> str:
        shown = self.item if isinstance(self.item, (str, Path)) else type(self.item).__name__
        return f"{type(self).__name__}({shown!r})"


class Image(Media):
    """A picture: a path, a PIL image or an (H, W, C) array."""

    modality = Modality.IMAGE


class Audio(Media):
    """A sound: a path or a `(waveform, sample_rate)` pair."""

    modality = Modality.AUDIO


class Text(Media):
    """A caption given as a shared-space vector (embedded by the text tower), not as tokens."""

    modality = Modality.TEXT


MEDIA: dict[Modality, type[Media]] = {cls.modality: cls for cls in (Image, Audio, Text)}


class Embedded:
    """A media item given by its shared-space vector: it reads as the item itself would (inside
    its modality's markers) without going through a tower again. A memory recalled from a store
    comes back this way; a bare tensor segment is marked `<vector>` instead.

    Args:
        vector: (D,) the item's embedding.
        modality: the modality the vector came from.
    """

    def __init__(self, vector: Tensor, modality: Modality | str) -> None:
        self.vector, self.modality = vector, Modality.parse(modality)

    def __repr__(self) -> str:
        shape = tuple(self.vector.shape) if isinstance(self.vector, Tensor) else type(self.vector).__name__
        return f"Embedded({self.modality}, dim={shape})"


Segment = Union[str, Media, Embedded, Tensor]
Prompt = Union[str, Sequence[Segment]]


@dataclass(frozen=True)
class Slot:
    """Where a media item's soft tokens go; `marker` is a modality name or `VECTOR`."""

    marker: str


class PromptFormat:
    """Turns prompts into decoder ids and generated ids back into text.

    Args:
        tokenizer: any mmembed tokenizer (`encode`, `decode`, `special_tokens`, bos/eos/pad ids).
        soft_tokens: placeholders per media item (the projector's k).
    """

    def __init__(self, tokenizer: Any, soft_tokens: int) -> None:
        self.tokenizer, self.soft_tokens = tokenizer, soft_tokens
        markers = [VECTOR, *(m.value for m in Modality)]
        names = ["<answer>", "<media>", *(t for m in markers for t in (f"<{m}>", f"</{m}>"))]
        own = tokenizer.special_tokens
        extra = [n for n in names if n not in own]
        self.ids = {n: own[n] if n in own else tokenizer.vocab_size + extra.index(n) for n in names}
        self.extra_tokens = extra
        self.vocab_size: int = tokenizer.vocab_size + len(extra)
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.answer_id, self.placeholder_id = self.ids["<answer>"], self.ids["<media>"]
        # pad only as a special token: CLIP's pad is id 0, the real token "!" (padding never reaches
        # the loss, and no real token attends to it: masked, or after them in a causal row)
        self._hidden = set(self.ids.values()) | set(own.values()) | {self.bos_id, self.eos_id}
        # what only a prompt holds (media slots, markers, <bos>, <answer>, a <pad>): never generated,
        # and a generated placeholder would be read as a media slot when the answer is fed back
        self.prompt_only_ids = sorted(self._hidden - {self.eos_id})

    def never_written(self, rows: int) -> list[int]:
        """Ids a decoder with `rows` output rows must never write: the prompt-only ids, and rows past
        this format's vocabulary (a table padded to a round size, as nanoGPT's 50,304 for GPT-2's
        50,257 tokens), which no tokenizer can decode."""
        return [*self.prompt_only_ids, *range(self.vocab_size, rows)]

    def encode(self, parts: Sequence[str | Slot], at_most: int | None = None) -> list[int]:
        """Prompt parts → ids from `<bos>` to `<answer>` inclusive. Adjacent text parts are one text,
        joined by a space (a Session's history turns, answers and question: "…star?blue and…"
        otherwise, words training never shows). With `at_most`, each text is encoded only as far as
        `at_most` + 1 ids: exact for a prompt that fits, and only known to be longer otherwise."""
        cap = None if at_most is None else at_most + 1
        ids = [self.bos_id]
        for part in join_text(parts):
            ids += self.slot_ids(part.marker) if isinstance(part, Slot) else self.tokenizer.encode(part, max_length=cap)
        ids.append(self.answer_id)
        return ids

    def slot_ids(self, marker: str) -> list[int]:
        """`<marker>`, k placeholders, `</marker>`: one media item's ids."""
        return [self.ids[f"<{marker}>"], *[self.placeholder_id] * self.soft_tokens, self.ids[f"</{marker}>"]]

    def length(self, segments: Sequence[Any], at_most: int | None = None) -> int:
        """Ids a prompt of `segments` takes (text tokens, k + 2 per media item, <bos> and <answer>).
        With `at_most`, a result above it only says the prompt is longer: each text is encoded only
        as far as needed (a 5 MB line was tokenised whole, 6 s and 1 GB, to be refused)."""
        cap = None if at_most is None else at_most + 1
        return 2 + sum(len(self.tokenizer.encode(seg, max_length=cap)) if isinstance(seg, str)
                       else self.soft_tokens + 2 for seg in join_text(segments))

    def encode_answer(self, text: str) -> list[int]:
        """Answer text → its ids followed by `<eos>` (what the decoder learns to write)."""
        return [*self.tokenizer.encode(text.strip()), self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids → text, without special or marker tokens."""
        return self.tokenizer.decode([i for i in ids if i not in self._hidden])


def join_text(parts: Sequence[Any]) -> list[Any]:
    """`parts` with each run of adjacent text parts as one stripped text, joined by spaces (blank
    ones dropped); anything else (a media slot or segment) as it is."""
    out: list[Any] = []
    run: list[str] = []
    for part in [*parts, None]:
        if isinstance(part, str):
            if part.strip():
                run.append(part.strip())
            continue
        if run:
            out.append(" ".join(run))
            run = []
        if part is not None:
            out.append(part)
    return out


_INLINE = re.compile(r"<(\w+):([^<>]*)>")
_UNCLOSED = re.compile(r"<(image|audio|text):(?![^<>]*>)", re.IGNORECASE)


def parse_inline(text: str, base: Path | None = None) -> list[str | Media]:
    """`"Describe <image:a.png> and <audio:b.wav>"` → ["Describe", Image(a.png), "and", Audio(b.wav)];
    `<text:a red star>` is `mm.Text("a red star")`, a caption read as its shared-space vector.

    Paths resolve against `base` (default: the working directory) and must name a file: a missing
    file, a folder or an empty `<image:>` is a UserError naming it.
    """
    if unclosed := _UNCLOSED.search(text):  # "Describe <image:a.png" went to the decoder as text
        kind = unclosed.group(1).lower()
        what = "CAPTION" if kind == "text" else "FILE"
        raise UserError(f"prompt holds <{kind}: without its closing '>': write <{kind}:{what}>")
    parts: list[str | Media] = []
    pos = 0
    for m in _INLINE.finditer(text):
        kind, name = m.group(1).lower(), m.group(2).strip()
        if kind == "text":  # the Python API's mm.Text: a caption as a vector, not as tokens
            if not name:
                raise UserError("prompt holds <text:> without a caption: write <text:CAPTION>")
            parts += [text[pos:m.start()], Text(name)]
            pos = m.end()
            continue
        if kind not in ("image", "audio"):
            if _names_a_file(name, base):  # <img:a.png> went to the decoder as text: no picture seen
                raise UserError(f"prompt holds <{m.group(1)}:{name}>: a file is named <image:FILE> or <audio:FILE>")
            continue  # any other <word:...> is text
        parts.append(text[pos:m.start()])
        if not name:
            raise UserError(f"prompt holds <{kind}:> without a path: write <{kind}:FILE>")
        try:
            path = Path(name).expanduser()
        except RuntimeError:  # ~user of no such user
            raise UserError(f"prompt names {name}, whose ~ names no user of this machine") from None
        path = path if path.is_absolute() or base is None else base / path
        try:
            st = path.stat()
        except FileNotFoundError:
            cut = " (an inline path ends at its first '>': a file whose name holds < or > cannot be named inline)"
            hint = normalisation_hint(path, "the path in the prompt")
            raise UserError(f"prompt names a missing {kind} file: {path}{hint}" + (cut if ">" in text[m.end():] else "")) \
                from None
        except (OSError, ValueError) as e:  # a name too long, no permission: it ended a chat
            raise UserError(f"prompt names an unreadable {kind} file: {path} ({getattr(e, 'strerror', None) or e})") \
                from None
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"prompt names a folder, not an {kind} file: {path}")
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"prompt names {path}, which is not a regular file (a device, pipe or socket)")
        parts.append(MEDIA[Modality(kind)](path))
        pos = m.end()
    parts.append(text[pos:])
    return [p for p in parts if not isinstance(p, str) or p.strip()]


def _names_a_file(name: str, base: Path | None) -> bool:
    """Whether text in a `<word:...>` tag is the path of an existing file: a path with a file
    suffix, on one line, each part short enough to be a file name (a quote is text, never probed),
    which names a file."""
    parts = Path(name).parts
    if not name or "\n" in name or not Path(name).suffix or any(len(p.encode()) > 255 for p in parts):
        return False
    try:
        path = Path(name).expanduser()
        return (path if path.is_absolute() or base is None else base / path).is_file()
    except (OSError, RuntimeError, ValueError):  # an unknown ~user, a name too long for the system
        return False


@dataclass
class Resolved:
    """A prompt ready for the decoder: its parts, and one unit vector per `Slot`, in order."""

    parts: list[str | Slot]
    vectors: Tensor  # (M, D) float32


def is_batch(prompts: Any) -> bool:
    """A list of prompts (each a list/tuple of segments), as opposed to one prompt."""
    return isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(
        isinstance(p, (list, tuple)) for p in prompts)


def resolve_prompts(prompts: Sequence[Prompt], embed: Callable[[Modality, list], Tensor], dim: int,
                    device: torch.device) -> list[Resolved]:
    """Check every segment and embed every media item (one tower call per modality).

    Args:
        prompts: the prompts of one batch.
        embed: (modality, items) → (N, dim) unit vectors (`Model.embed`).
        dim: the shared space's dimension D.
        device: where the model lives; given vectors must already be there.

    Returns:
        One `Resolved` per prompt. Raises BadInput naming the prompt and segment at fault.
    """
    many = len(prompts) > 1
    parts: list[list[str | Slot]] = []
    slots: list[list[Tensor | None]] = []
    pending: dict[Modality, list[tuple[int, int, str, Any]]] = {}
    for p, prompt in enumerate(prompts):
        if isinstance(prompt, (str, Media, Embedded, Tensor)):  # one segment alone
            segments = [prompt]
        elif isinstance(prompt, (list, tuple)):
            segments = list(prompt)
        else:
            raise BadInput(f"{f'prompt {p}' if many else 'prompt'}: expected a str, a segment or a list of segments, "
                           f"got {type(prompt).__name__}")
        own_parts: list[str | Slot] = []
        own_slots: list[Tensor | None] = []
        for i, seg in enumerate(segments):
            where = f"prompt {p} segment {i}" if many else f"prompt segment {i}"
            if isinstance(seg, str):
                if m := SURROGATE.search(seg):  # undecodable bytes of a command line, kept as surrogates
                    raise BadInput(f"{where}: text is not valid UTF-8 (an undecodable character at position "
                                   f"{m.start()})")
                own_parts.append(seg)
            elif isinstance(seg, Media):
                pending.setdefault(seg.modality, []).append((p, len(own_slots), where, seg.item))
                own_parts.append(Slot(seg.modality.value))
                own_slots.append(None)
            elif isinstance(seg, Embedded):
                own_parts.append(Slot(seg.modality.value))
                own_slots.append(_check_vector(seg.vector, dim, device, where))
            elif isinstance(seg, Tensor):
                own_parts.append(Slot(VECTOR))
                own_slots.append(_check_vector(seg, dim, device, where))
            else:  # a list here: a batch that mixes prompts given as lists with bare strings
                hint = ("a batch is a list of prompts, each a list: wrap a one-segment prompt as ['text']; "
                        if isinstance(seg, (list, tuple)) and not many else "")
                raise BadInput(f"{where}: unsupported type {type(seg).__name__} ({hint}use str, mm.Image, "
                               "mm.Audio, mm.Text, mm.decoder.Embedded or a 1-D torch tensor)")
        if not any(isinstance(x, Slot) or x.strip() for x in own_parts):
            raise BadInput(f"{'prompt ' + str(p) if many else 'prompt'} is empty: give text or media")
        parts.append(own_parts)
        slots.append(own_slots)
    for modality, entries in pending.items():
        for (p, j, _, _), z in zip(entries, _embed_all(embed, modality, entries)):
            slots[p][j] = z.to(device)
    return [Resolved(pp, torch.stack(ss) if ss else torch.zeros(0, dim, device=device))
            for pp, ss in zip(parts, slots)]


def _embed_all(embed: Callable[[Modality, list], Tensor], modality: Modality,
               entries: list[tuple[int, int, str, Any]]) -> Tensor:
    try:
        return embed(modality, [item for *_, item in entries])
    except UserError:
        for _, _, where, item in entries:  # find the item at fault and name its segment
            try:
                embed(modality, [item])
            except UserError as e:
                raise BadInput(f"{where} ({modality}): {_reason(e)}") from None
        raise


def _reason(e: Exception) -> str:
    return re.sub(r"^\w+ item \d+: ", "", str(e))


def _check_vector(z: Tensor, dim: int, device: torch.device, where: str) -> Tensor:
    if not isinstance(z, Tensor):  # an Embedded's numpy array or list: refused, as a bare segment is
        raise BadInput(f"{where}: a vector must be a 1-D torch tensor, got {type(z).__name__} "
                       "(torch.as_tensor(vector) makes one)")
    if not z.is_floating_point():
        raise BadInput(f"{where}: a vector must be a floating-point tensor, got {z.dtype}")
    if z.dim() != 1 or z.shape[0] != dim:
        raise BadInput(f"{where}: a vector must have shape ({dim},), the shared space's dimension; "
                       f"got {tuple(z.shape)}")
    if z.is_meta:
        raise BadInput(f"{where}: the vector is on meta, which holds no values")
    if not torch.isfinite(z).all():  # in the vector's own dtype: float64's 1e300 is finite
        raise BadInput(f"{where}: the vector holds NaN or Inf")
    peak = z.abs().max()
    if peak == 0:
        raise BadInput(f"{where}: a zero vector has no direction in the shared space")
    z = (z / peak).float()  # scaled first: float64's 1e300 (or 1e-300) fits float32 after it
    # onto the model's device: `model.embed` and `Index.vector` give CPU tensors, and a model on a GPU
    # refused them ("the vector is on cpu"), the README's own prompts among them
    return (z / z.norm()).to(device)
