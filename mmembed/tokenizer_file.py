"""What a `tokenizer.json` must be for mmembed's byte-level BPE: the checks `Tokenizer` runs on
the file as written, before the Rust library reads it (some options make it panic) and on every
tokenizer it wraps. A hand-edited file that would load and then change ids or text is refused.
Also what the file's strings mean: GPT-2's byte → character table, and the bytes each id stands for."""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, pre_tokenizers

from mmembed.errors import UserError
from mmembed.text_encoding import SURROGATE


def check_tokenizer_json(spec: dict) -> None:
    """ValueError unless `spec` (a tokenizer's JSON) is a plain byte-level BPE: no normalizer,
    GPT-2's byte-level pre-tokenizer without a prefix space. Anything else (a lower-casing
    normalizer, a `Whitespace` pre-tokenizer, a prefix space) breaks `decode(encode(s)) == s`,
    which every caller relies on. A truncation or padding (transformers' `save_pretrained` writes
    what its last call set) is let through: `Tokenizer` turns both off."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ValueError("it is not a JSON object with a model")
    pre, normalizer = spec.get("pre_tokenizer"), spec.get("normalizer")
    if normalizer is not None:
        raise ValueError(f"it has a {normalizer.get('type') if isinstance(normalizer, dict) else ''} normalizer")
    if (not isinstance(pre, dict) or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space")
            or not pre.get("use_regex", True)):
        raise ValueError("its pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=True)")
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError("its model is not BPE")
    # Options a trained file leaves off, each of which changes ids or text behind our back
    # (a hand-edited file would load and then sample or mangle words). A post_processor (the
    # template transformers' `save_pretrained` writes) is no such option: `encode` never applies it.
    changed = [f"model.{name}" for name in ("dropout", "continuing_subword_prefix", "end_of_word_suffix")
               if model.get(name)]
    changed += [f"model.{name}" for name in ("byte_fallback", "ignore_merges") if model.get(name)]
    if changed:
        raise ValueError(f"it sets {', '.join(changed)}, which an mmembed tokenizer leaves off")
    added = spec.get("added_tokens") or []
    for token in added:
        if (not isinstance(token, dict) or not token.get("special")
                or any(token.get(k) for k in ("lstrip", "rstrip", "single_word", "normalized"))):
            raise ValueError(f"its added token {token.get('content') if isinstance(token, dict) else token!r} is "
                             "not a plain special token (special, no lstrip/rstrip/single_word/normalized)")
        content = token.get("content")
        if not isinstance(content, str) or not content:
            raise ValueError(f"its added token {content!r} is not a non-empty string")
        if holds_whitespace(content):
            raise ValueError(f"its special token {content!r} holds whitespace, which a truncation (cutting at spaces) "
                             "could split; use a form like <my_token>")
    _check_ids(model, added)
    _check_merges(model, {t["content"] for t in added})


def holds_whitespace(token: str) -> bool:
    """Whether `token` holds whitespace, which no special token may: a truncation cuts the text at
    spaces (`text_encoding.prefix_cut`), and could cut such a token in two."""
    return any(c.isspace() for c in token)


def _check_ids(model: dict, added: list[dict]) -> None:
    """Every id is an int below the number of tokens: one huge id made the tokenizer build tables
    that long (10**8 took 1.3 GB, 2**32 - 2 was killed at 20 GB), so it is refused before that."""
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError("its model's vocab is not a map of tokens")
    size = len(set(vocab) | {t["content"] for t in added})  # specials are in both, as trainers write them
    for token, i in [*vocab.items(), *((t["content"], t.get("id")) for t in added)]:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
            raise ValueError(f"its token {token!r} has id {i!r}; ids are integers from 0 to {size - 1}, one per token")


def _check_merges(model: dict, specials: set) -> None:
    """Every token beyond the bytes and the specials is one merge's result, and every merge makes
    one: a file that lost merges would load and encode into other ids (the model's embeddings
    then read the wrong rows)."""
    vocab, merges = model.get("vocab"), model.get("merges")
    pairs = isinstance(merges, list) and all(
        isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)) for m in merges)
    if not isinstance(vocab, dict) or not pairs:
        raise ValueError("its model's vocab is not a map of tokens or its merges not a list of pairs")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError("two of its vocabulary tokens share one id")
    results = ["".join(m.split(" ", 1)) if isinstance(m, str) else "".join(m) for m in merges]
    made = set(results)
    bytes_ = set(pre_tokenizers.ByteLevel.alphabet())  # the 256 single-byte tokens (`byte_to_unicode`'s)
    merged = {t for t in vocab if t not in bytes_ and t not in specials}
    unmade = merged - made
    if unmade or len(made) != len(merges) or not made <= set(vocab):
        raise ValueError(f"its merges do not match its vocabulary ({len(merges)} merges for {len(merged)} "
                         f"merged tokens, {len(unmade)} of which no merge makes)")
    # A special that is also a byte or a merge's result comes out of plain text: "Ã©" (the bytes
    # of "é") made "café" encode to the special's id, and decode to "cafÃ©".
    clash = sorted((made | bytes_) & specials)
    if clash:
        plain = decoders.ByteLevel().decode([clash[0]])  # the text whose bytes the token stands for
        raise ValueError(f"its special token {clash[0]!r} is also the token of plain text {plain!r}, which "
                         "would then encode to the special; use a form like <name>")
    _check_merge_order(results, vocab)


def _check_merge_order(results: list[str], vocab: dict) -> None:
    """A merge's rank is its place in the list, and the trainer gives each result the next id: a
    list reordered by hand (same merges as a set) loaded and encoded text into other ids."""
    for rank in range(1, len(results)):
        before, after = vocab[results[rank - 1]], vocab[results[rank]]
        if after <= before:
            raise ValueError(f"its merges are out of order: merge {rank} makes {results[rank]!r} (id {after}) after "
                             f"merge {rank - 1} made id {before}; a trained file's merges make ever larger ids, "
                             "and their order decides the ids")


def check_special(s: object) -> None:
    """UserError unless `s` can be a special token: a non-empty valid string without whitespace
    that plain text cannot produce."""
    # A special that is one GPT-2 pre-token ("hello", "<<>>") could be produced by BPE merges
    # from plain text, which would defeat `allowed_special`; "<name>" spans three pre-tokens.
    if not isinstance(s, str) or not s or SURROGATE.search(s):
        raise UserError(f"special token {s!r} must be a non-empty valid string")
    if holds_whitespace(s):
        raise UserError(f"special token {s!r} must hold no whitespace; use a form like <my_token>")
    if len(pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(s)) < 2:
        raise UserError(f"special token {s!r} could arise from plain text; use a form like <name>")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table, which byte-level BPE vocabularies use.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, soft hyphen...)
    are shifted to U+0100 onward so that no vocabulary entry contains whitespace or control chars.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in set(keep)]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(0x100 + i) for i, b in enumerate(shifted)})
    return table


def id_to_bytes(hf: tokenizers.Tokenizer, special: dict[str, int]) -> list[bytes]:
    """The bytes each id stands for: what makes decode exact and byte strings decodable."""
    byte_of = {c: b for b, c in byte_to_unicode().items()}
    vocab = hf.get_vocab(with_added_tokens=True)
    table: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        if token in special:
            table[i] = token.encode("utf-8")
            continue
        try:
            table[i] = bytes(byte_of[c] for c in token)
        except KeyError:
            raise ValueError(f"token {token!r} is not byte-level BPE") from None
    if None in table:
        raise ValueError(f"vocabulary ids are not contiguous (id {table.index(None)} is missing)")
    return table  # type: ignore[return-value]
