"""B-load: data loading throughput (samples/s), ours vs a plain loader, with and without cache.

Work: ~500 synthetic-world-like rows (64 px PNG of a coloured shape, 1 s 16 kHz WAV tone,
caption), each loaded as image + audio + text and batched, 2 DataLoader workers, batch 64.

- ours: `ManifestDataset` + `build_loader` (header bomb guard, mode conversion, skip markers,
  per-sample seeds, padding masks, `Batch`).
- anchor: what a minimal training script does with the same files and workers: PIL
  `convert("RGB")` + open_clip's eval `image_transform`, `soundfile.read` + the same
  MelSpectrogram, tokenizer `encode`, padding in a small collate. No guards, no skipping.
- cached: ours with `cache=True` (filled by `materialize` before the workers fork); the
  one-off fill time is reported separately.

Each figure is the median of 5 timed epochs over persistent workers, after one warm-up epoch;
the loaders take turns epoch by epoch.
`ratio` > 1 means ours is faster than the anchor.

    python -m benchmarks.bench_loading [--quick]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from open_clip.transform import image_transform
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import quick_main, ratio_report, setup
from mmembed.data import ManifestDataset, build_loader, read_manifest
from mmembed.modality import Modality
from mmembed.preprocess import AudioPreprocessor, ImagePreprocessor, TextPreprocessor
from mmembed.tokenizer import Tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
RATE, SIZE, BATCH, WORKERS = 16000, 64, 64, 2


def make_rows(root: Path, n: int, seed: int = 0) -> Path:
    """Write n (PNG, WAV, caption) rows and their manifest; returns the manifest path."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        im = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
        x, y = (int(v) for v in rng.integers(12, 52, 2))
        r = int(rng.integers(6, 12))
        box = (x - r, y - r, x + r, y + r)
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLOURS[colour])
        im.save(root / f"{i}.png")
        t = np.arange(RATE) / RATE
        freq = 220 * (1 + list(COLOURS).index(colour))
        sf.write(root / f"{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), RATE, subtype="PCM_16")
        caption = f"a {colour} {shape} at {x} {y}"
        row = {"image": f"{i}.png", "audio": f"{i}.wav", "text": caption, "label": f"{colour}-{shape}"}
        lines.append(json.dumps(row))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class PlainDataset(Dataset):
    """The anchor: the same decoding and features, none of the guards."""

    def __init__(self, manifest: Path, tokenizer: Tokenizer, audio: AudioPreprocessor) -> None:
        self.root = manifest.parent
        self.rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        self.tokenizer, self.mel = tokenizer, audio.filterbank
        self.transform = image_transform(SIZE, is_train=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        image = self.transform(Image.open(self.root / row["image"]).convert("RGB"))
        wave, _ = sf.read(self.root / row["audio"], dtype="float32")
        mel = torch.log(self.mel(torch.from_numpy(wave)) + 1e-6)
        ids = torch.tensor(self.tokenizer.encode(row["text"], add_bos=True, add_eos=True, max_length=32))
        return image, mel, ids


def plain_collate(items):
    images, mels, ids = zip(*items)
    text = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
    audio = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
    return torch.stack(images), audio, text


def epoch_rates(loaders: dict[str, DataLoader], n: int, repeats: int) -> dict[str, float]:
    """Samples/s per loader: median of `repeats` timed epochs after one warm-up epoch each.

    The loaders take turns epoch by epoch, so a burst of load on the shared machine hits
    all of them rather than whichever happened to run then.
    """
    for loader in loaders.values():
        for _ in loader:
            pass
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            t0 = time.perf_counter()
            for _ in loader:
                pass
            times[name].append(time.perf_counter() - t0)
    return {name: n / statistics.median(t) for name, t in times.items()}


def run(quick: bool = False) -> dict:
    setup(threads=2)
    n, repeats = (128, 2) if quick else (512, 5)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_rows(Path(tmp), n)
        captions = [json.loads(line)["text"] for line in manifest.read_text().splitlines()]
        tok = Tokenizer.train(captions, vocab_size=300)
        pres = {
            Modality.IMAGE: ImagePreprocessor(SIZE),
            Modality.AUDIO: AudioPreprocessor(RATE),
            Modality.TEXT: TextPreprocessor(tok, max_length=32),
        }
        rows = read_manifest(manifest)
        plain = PlainDataset(manifest, tok, pres[Modality.AUDIO])
        cached_ds = ManifestDataset(rows, pres, cache=True)
        t0 = time.perf_counter()
        cached_loader = build_loader(cached_ds, BATCH, shuffle=True, num_workers=WORKERS)  # materialises
        fill_s = time.perf_counter() - t0
        rates = epoch_rates(
            {
                "ours": build_loader(ManifestDataset(rows, pres), BATCH, shuffle=True, num_workers=WORKERS),
                "anchor": DataLoader(plain, BATCH, shuffle=True, num_workers=WORKERS, collate_fn=plain_collate,
                                     persistent_workers=True),
                "cached": cached_loader,
            },
            n,
            repeats,
        )
        ours, anchor, cached = rates["ours"], rates["anchor"], rates["cached"]
    report = ratio_report("B-load", ours, anchor, "samples/s", higher_is_better=True, rows=n, workers=WORKERS,
                          batch=BATCH)
    report.update(cached=cached, cached_vs_uncached=cached / ours, cache_fill_s=fill_s)
    return report


if __name__ == "__main__":
    quick_main(run, __doc__, "small sizes")  # --help, or a misspelt --quik, ran the full benchmark
