"""ManifestDataset: manifest rows + per-modality preprocessors → samples (or skip markers).

A row whose file is missing, empty, corrupt or otherwise unusable is skipped WHOLE: its other
modalities are not kept as a partial row. A partial row would silently change which pairs the
loss sees (a bad image would turn an image–text–audio triple into a text–audio pair), and the
point of skipping is that data problems are visible and counted, not absorbed. The skip is a
`Skipped(line, reason)` marker that travels inside the batch (see `collate`), so counting
works identically with any number of DataLoader workers.

Randomness: when the sampler hands out `(index, seed)` keys (see `loader.EpochBatchSampler`)
and a preprocessor is stochastic, it draws (a random crop) from a generator of the sample's own,
seeded with `seed` and passed as `pre(item, generator=...)`; a preprocessor's `augment` step
(SpecAugment) runs after the cache, on a generator seeded with the same seed, so caching and
augmentation combine. Neither touches the process's global RNG, so augmentations are a pure
function of (seed, epoch, index): the same with 0 or 8 workers or from several threads, cached or
not, and after a resume; and loading a sample leaves the caller's random stream (dropout) as it was.

Captions: with `caption_sampling="random"` a row with alternative captions (`Row.captions`)
trains on one caption of its pool `(primary, *alternatives)` per epoch, drawn from the same
per-sample seed, so the draw shares those guarantees. Without a seed, and always with
"primary" (evaluation, indexing), a row gives its primary caption. The cache holds the primary
sample and, separately, each alternative's preprocessed text: a draw is never cached as the row.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmembed.data.columns import column_hints, misnamed_columns
from mmembed.data.manifest import CAPTION_MODALITY, Manifest, Row
from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality

log = logging.getLogger(__name__)

CaptionSampling = Literal["primary", "random"]
_CAPTION_STREAM = 0x5EED_CA97  # keeps the caption draw's stream apart from augmentation's


@dataclass(frozen=True)
class Sample:
    """One preprocessed row: a tensor per modality the row has."""

    line: int
    inputs: dict[Modality, Tensor]
    label: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A row left out of the batch, and why."""

    line: int
    reason: str


class ManifestDataset(Dataset):
    """Map-style dataset over manifest rows.

    Args:
        manifest: a `Manifest` (from `read_manifest`) or a list of `Row`.
        preprocessors: modality → preprocessor. Modalities a row has but no preprocessor
            handles are ignored (a text–image model can train on a manifest with audio).
        strict: raise `BadInput` naming the manifest, line and file instead of skipping.
        cache: keep each row's result (sample or skip) in memory after its first load.
            Refused when a preprocessor is stochastic (it would freeze one augmentation).
            The cache lives in the process that loads: with DataLoader workers each worker
            would hold its own partial copy, so `build_loader` first fills it in the main
            process with `materialize()`; forked workers then share it copy-on-write.
        caption_sampling: "primary" gives every row its primary caption; "random" draws one
            of the row's caption pool per `(index, seed)` key (training). Plain-index keys
            always give the primary.

    `__getitem__` takes an index, or an `(index, seed)` pair, and returns `Sample | Skipped`.
    """

    def __init__(
        self,
        manifest: Manifest | Sequence[Row],
        preprocessors: Mapping[Modality | str, Any],
        *,
        strict: bool = False,
        cache: bool = False,
        caption_sampling: CaptionSampling = "primary",
    ) -> None:
        self.rows: list[Row] = list(manifest.rows if isinstance(manifest, Manifest) else manifest)
        self.source: Path | None = manifest.path if isinstance(manifest, Manifest) else None
        self.preprocessors = {m: preprocessors[m] for m in Modality if m in preprocessors}
        unknown = set(map(str, preprocessors)) - {str(m) for m in Modality}
        if unknown:
            raise UserError(f"unknown modality {sorted(unknown)[0]!r} (valid: {', '.join(Modality)})")
        self.strict = strict
        self._check_overlap()
        stochastic = [m for m, p in self.preprocessors.items() if getattr(p, "stochastic", False)]
        if cache and stochastic:
            raise UserError(self._cache_refusal(stochastic))
        self.stochastic = bool(stochastic)
        self._take_generator = {m for m in stochastic if _takes_generator(self.preprocessors[m])}
        self.augmenting = [m for m, p in self.preprocessors.items() if getattr(p, "augments", False)]
        self.cache: dict[int, Sample | Skipped] | None = {} if cache else None
        self.caption_sampling = _check_sampling(caption_sampling, self.rows, CAPTION_MODALITY in self.preprocessors)
        self._draws_captions = self.caption_sampling == "random" and CAPTION_MODALITY in self.preprocessors
        # index → the row's alternative captions, preprocessed (filled beside `cache`)
        self.caption_cache: dict[int, tuple[Tensor, ...]] | None = {} if cache else None

    def _cache_refusal(self, stochastic: list[Modality]) -> str:
        # named as a config key, with the Python argument beside it: the CLI and the API reach this
        fixes = []
        for m in stochastic:
            options = getattr(self.preprocessors[m], "random_options", ())
            fixes += [f"model.towers.{m}.preprocess.{o}" for o in options] or [
                f"the random options of model.towers.{m}.preprocess"]
        return (f"data.cache=true (cache=True) would freeze one random draw of the {', '.join(stochastic)} "
                f"preprocessor(s) built for training; set data.cache=false (cache=False), or turn off "
                f"{' and '.join(fixes)}")

    def _check_overlap(self) -> None:
        present = {m for row in self.rows for m in row.items}
        if self.rows and not present & set(self.preprocessors):
            have = ", ".join(sorted(present)) or "none"
            raise UserError(f"{self._where()}no row has a modality this model reads (rows have: {have}; model reads: "
                            f"{', '.join(self.preprocessors) or 'none'}){self._hints(set(self.preprocessors))}")
        ignored = present - set(self.preprocessors)
        if ignored:
            log.info("ignoring manifest column(s) %s: no preprocessor for them", ", ".join(sorted(ignored)))

    def check_pairs(self, captioned: bool = False) -> None:
        """For training, which learns from pairs: UserError unless some row has two modalities this
        dataset reads (every batch would train nothing), naming the columns read as metadata; a
        warning for a column that looks like a modality no row has (its tower would learn nothing).
        `captioned`: a captioning loss trains too, on any row with a caption (its own text vector
        writes it), so only the warning applies then."""
        reads = set(self.preprocessors)
        if len(reads) < 2:  # a loader of one modality (the captions alone): no row can hold a pair
            return
        absent = reads - {m for row in self.rows for m in row.items}
        learns = captioned and any(CAPTION_MODALITY in row.items for row in self.rows)
        if self.rows and not learns and not any(len(reads & row.items.keys()) >= 2 for row in self.rows):
            have = ", ".join(sorted({"+".join(sorted(reads & row.items.keys())) or "none" for row in self.rows}))
            hints = self._hints(absent) or "; columns read as metadata: " + (", ".join(sorted(self._meta())) or "none")
            raise UserError(f"{self._where()}no row has two of the modalities this model trains on "
                            f"({', '.join(self.preprocessors)}; rows have: {have}): no pair to learn from{hints}")
        for column, m in misnamed_columns(self._meta(), absent).items():
            log.warning("%scolumn %r is read as metadata and no row has %s: did you mean %r? (the %s tower "
                        "learns nothing)", self._where(), column, m, m.value, m)

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def _meta(self) -> set[str]:
        return {k for row in self.rows for k in row.meta}

    def _hints(self, wanted: set[Modality]) -> str:
        return "".join(f"; {hint}" for hint in column_hints(self._meta(), wanted))

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """Modalities this dataset yields (present in the rows and handled by a preprocessor)."""
        present = {m for row in self.rows for m in row.items}
        return tuple(m for m in self.preprocessors if m in present)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | Skipped:
        index, seed = key if isinstance(key, tuple) else (key, None)
        caption = self.draw_caption(index, seed)
        # the sample's own generator: a forked, reseeded global one was shared by every thread
        generator = torch.Generator().manual_seed(seed) if seed is not None and self.stochastic else None
        return self._augment(self._cached_load(index, caption, generator), seed)

    def draw_caption(self, index: int, seed: int | None) -> int:
        """Position in row `index`'s caption pool that the key `(index, seed)` trains on (0 = primary)."""
        n = len(self.rows[index].caption_pool)
        if not self._draws_captions or seed is None or n < 2:
            return 0
        return random.Random(seed ^ _CAPTION_STREAM).randrange(n)

    def _cached_load(self, index: int, caption: int = 0, generator: torch.Generator | None = None) -> Sample | Skipped:
        if self.cache is None:  # a stochastic preprocessor (the only use of `generator`) has no cache
            return self.load(index, caption, generator)
        if index not in self.cache:
            self.cache[index] = self.load(index)
        result = self.cache[index]
        if caption == 0 or isinstance(result, Skipped):
            return result
        if index not in self.caption_cache:
            self.caption_cache[index] = self._alternatives(index)
        inputs = {**result.inputs, CAPTION_MODALITY: self.caption_cache[index][caption - 1]}
        return Sample(result.line, inputs, result.label)

    def _alternatives(self, index: int) -> tuple[Tensor, ...]:
        """Row `index`'s alternative captions, preprocessed; `load` has checked they all pass."""
        pre = self.preprocessors[CAPTION_MODALITY]
        return tuple(pre(caption) for caption in self.rows[index].captions)

    def _augment(self, result: Sample | Skipped, seed: int | None) -> Sample | Skipped:
        """Run the preprocessors' `augment` steps (seeded per sample); the cached input stays intact."""
        if not self.augmenting or isinstance(result, Skipped):
            return result
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        inputs = {m: self.preprocessors[m].augment(t, generator) if m in self.augmenting else t
                  for m, t in result.inputs.items()}
        return Sample(result.line, inputs, result.label)

    def load(self, index: int, caption: int = 0, generator: torch.Generator | None = None) -> Sample | Skipped:
        """Preprocess row `index` (no cache) with caption `caption` of its pool. A bad item
        skips the whole row. `generator`: what stochastic preprocessors draw from (None: the global RNG)."""
        row = self.rows[index]
        inputs: dict[Modality, Tensor] = {}
        for modality, item in row.items.items():
            pre = self.preprocessors.get(modality)
            if pre is None:
                continue
            try:
                inputs[modality] = _preprocessed(pre, item, generator, modality in self._take_generator)
            except BadInput as e:
                return self._skip(row, f"{modality}: {e}")
        if not inputs:
            return Skipped(row.line, f"no modality this model reads (row has {', '.join(row.items)})")
        if self._draws_captions and row.captions and CAPTION_MODALITY in inputs:
            # every alternative is checked, whichever this epoch draws: a row's skip never
            # depends on the draw (nor on whether the dataset caches)
            try:
                alternatives = self._alternatives(index)
            except BadInput as e:
                return self._skip(row, f"{CAPTION_MODALITY} (an alternative caption): {e}")
            if self.cache is not None:  # `_cached_load` reads them from here: tokenised once
                self.caption_cache[index] = alternatives
            if caption:
                inputs[CAPTION_MODALITY] = alternatives[caption - 1]
        return Sample(row.line, inputs, row.label)

    def _skip(self, row: Row, reason: str) -> Skipped:
        if self.strict:
            where = f"{self.source}:{row.line}" if self.source else f"line {row.line}"
            raise BadInput(f"{where}: {reason}") from None
        log.debug("skipping line %d: %s", row.line, reason)
        return Skipped(row.line, reason)

    def drop_cache(self) -> None:
        """Load every row afresh from now on (validation streams a set too large to keep)."""
        self.cache = self.caption_cache = None

    def materialize(self, num_workers: int = 0, chunk: int = 64) -> list[tuple[int, str]]:
        """Fill the cache for every row, in parallel with `num_workers` processes.

        Returns the (line, reason) of the skipped rows. Run it before the training loader forks
        its workers so that they inherit one shared cache instead of each building its own.
        """
        if self.cache is None:
            raise UserError("materialize() needs a dataset built with cache=True")
        todo = [i for i in range(len(self)) if i not in self.cache]
        if num_workers > 0 and todo:
            # its own generator: a DataLoader without one draws its workers' base seed from the global
            # random stream, which training (dropout) and a resumed run's restored state go on from
            loader = DataLoader(_Subset(self, todo), batch_size=chunk, num_workers=num_workers, collate_fn=_as_list,
                                generator=torch.Generator().manual_seed(0))
            for pairs in loader:
                for index, result in pairs:
                    self.cache[index] = _own_memory(result)
        for index in todo:  # whatever the workers did not fill (everything when num_workers=0); no augmentation
            self._cached_load(index)
        if self._draws_captions:
            for index, result in self.cache.items():
                if isinstance(result, Sample) and self.rows[index].captions and index not in self.caption_cache:
                    self.caption_cache[index] = self._alternatives(index)
        return [(r.line, r.reason) for r in self.cache.values() if isinstance(r, Skipped)]


def _check_sampling(sampling: str, rows: list[Row], reads_captions: bool) -> CaptionSampling:
    valid = get_args(CaptionSampling)
    if sampling not in valid:
        raise UserError(f"unknown caption_sampling {sampling!r} (valid: {', '.join(valid)})")
    if sampling == "random":
        with_pool = sum(1 for row in rows if row.captions)
        if not reads_captions or not with_pool:
            log.warning("caption_sampling='random' has no effect: %s", "no row has alternative captions"
                        if reads_captions else "the model reads no captions")
        else:
            log.info("caption sampling: %d of %d rows have alternative captions", with_pool, len(rows))
    return sampling


class _Subset(Dataset):
    """Indices of `dataset` to compute, returning (index, result) pairs; used by materialize."""

    def __init__(self, dataset: ManifestDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Sample | Skipped]:
        index = self.indices[i]
        return index, self.dataset.load(index)


def _as_list(batch: list) -> list:
    return batch


def _own_memory(result: Sample | Skipped) -> Sample | Skipped:
    """Copy worker tensors out of shared memory: one shm segment per cached tensor would
    exhaust file descriptors on a large dataset."""
    if isinstance(result, Skipped):
        return result
    return Sample(result.line, {m: t.clone() for m, t in result.inputs.items()}, result.label)


def _takes_generator(pre: Any) -> bool:
    """Whether `pre`'s `__call__` takes `generator=` (one written to the protocol before it does not)."""
    try:
        params = inspect.signature(pre).parameters
    except (TypeError, ValueError):  # no signature to read: the old way
        return False
    return "generator" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _preprocessed(pre: Any, item: Any, generator: torch.Generator | None, takes_generator: bool) -> Tensor:
    """`pre(item)`; a stochastic preprocessor draws from `generator` (the sample's own): passed to it
    when it takes one, else it runs on the global generator seeded alike, in a fork that gives the
    caller's state back."""
    if generator is None or not getattr(pre, "stochastic", False):
        return pre(item)
    if takes_generator:
        return pre(item, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(generator.initial_seed())
        return pre(item)
