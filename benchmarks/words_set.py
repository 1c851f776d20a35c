"""Build a small real dataset with held-out styles: printed words in typefaces, spoken words in voices.

    python -m benchmarks.words_set data/words            # 200 words, the splits below
    python -m benchmarks.words_set data/words --words 40 # smaller

Each class is an English word. A row pairs the word printed in one typeface (a 64x64 PNG) with
the word spoken by one voice (a WAV from espeak-ng) and the word as its caption and label:

    {"image": "img/apple-train-03.png", "audio": "wav/apple-train-03.wav", "text": "apple", "label": "apple"}

- `train.jsonl`: 12 rows per word, one per training typeface; voices rotate with the word, so no
  typeface is tied to one voice.
- `val.jsonl`: 2 rows per word in the training typefaces and voices (fresh position, size, tilt).
- `test.jsonl`: one row per word and held-out typeface, each with a held-out voice. No held-out
  typeface shares its design with a training one (metric clones such as Liberation Sans and
  Nimbus Sans count as one design), and no held-out voice shares its accent or its variant with a
  training voice: the test measures reading and listening in styles never seen, as zero-shot
  classification over the words (`labels.txt`).

The material is real: typefaces installed by Debian's font packages, and espeak-ng's formant
speech. Install them with

    apt-get install espeak-ng fonts-dejavu-core fonts-liberation fonts-urw-base35 fonts-crosextra-carlito \
        fonts-crosextra-caladea fonts-open-sans fonts-roboto fonts-lato fonts-cantarell fonts-ebgaramond \
        fonts-linuxlibertine fonts-comic-neue fonts-noto-mono

The builder stops with one line naming what is missing. Everything is seeded: the same command
builds the same files.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

# 200 concrete, common words of 3-7 letters, no two pronounced alike
WORDS = """
apple bread chair table house river stone cloud plant horse tiger zebra snake mouse eagle shark
whale sheep goat duck frog camel panda lemon melon grape peach cherry onion carrot potato tomato
pepper honey sugar salt butter cheese pizza pasta soup salad cookie candle lamp clock phone radio
piano guitar drum violin flute trumpet camera laptop pencil marker paper book letter stamp ticket
wallet purse basket bucket bottle glass plate spoon fork knife pillow blanket mirror window door
garden forest desert island beach ocean valley canyon bridge tower castle church school market
station airport harbor street road tunnel train truck bicycle rocket planet comet moon star rainbow
thunder winter summer autumn spring morning evening shadow silver copper iron marble crystal diamond
pearl ribbon button zipper jacket shirt sweater scarf glove boot sandal helmet crown ring doctor
nurse farmer pilot sailor artist singer dancer driver baker soldier teacher hunter king queen prince
wizard robot dragon ghost giant monkey rabbit turtle lizard parrot penguin spider beetle lobster
octopus dolphin kitten puppy pony donkey tent rope ladder hammer shovel wagon engine magnet battery
kettle oven fridge sofa carpet curtain shower towel brush coffee juice water milk banana coconut
walnut almond pumpkin garlic ginger
""".split()

# (design, a typeface file of it): one file per design, in a fixed order; held out: the last four
TRAIN_FACES = [
    ("helvetica", "LiberationSans-Regular.ttf"), ("times", "LiberationSerif-Regular.ttf"),
    ("courier", "LiberationMono-Regular.ttf"), ("palatino", "P052-Roman.otf"),
    ("century", "C059-Roman.otf"), ("bookman", "URWBookman-Light.otf"),
    ("vera-sans", "DejaVuSans.ttf"), ("vera-serif", "DejaVuSerif.ttf"),
    ("cantarell", "Cantarell-Regular.otf"), ("lato", "Lato-Regular.ttf"),
    ("roboto", "Roboto-Regular.ttf"), ("biolinum", "LinBiolinum_R.otf"),
]
TEST_FACES = [
    ("open-sans", "OpenSans-Regular.ttf"), ("libertine", "LinLibertine_R.otf"),
    ("caladea", "Caladea-Regular.ttf"), ("carlito", "Carlito-Regular.ttf"),
]
FONT_DIRS = ("/usr/share/fonts", "/usr/share/texmf/fonts", "/usr/local/share/fonts")

# espeak-ng voices: accent + variant (+ pitch, words/min); training and held-out share neither
TRAIN_VOICES = [
    (accent, variant, pitch, speed)
    for accent in ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland")
    for variant, pitch, speed in (("m1", 45, 160), ("f2", 60, 150), ("m3", 35, 175))
]
TEST_VOICES = [("en-029", "m7", 50, 165), ("en-gb-x-gbclan", "f4", 65, 155),
               ("en-gb-x-gbcwmd", "m6", 40, 170), ("en-029", "f5", 55, 145)]

IMAGE_SIZE = 64
VAL_PER_WORD = 2


@dataclass(frozen=True)
class Sample:
    word: str
    split: str
    index: int
    face: Path
    voice: tuple[str, str, int, int]
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.word}-{self.split}-{self.index:02d}"


def find_faces(names: list[tuple[str, str]]) -> list[Path]:
    """The installed file of each typeface; one line naming the missing ones otherwise."""
    found: dict[str, Path] = {}
    for folder in FONT_DIRS:
        for path in sorted(Path(folder).rglob("*")) if Path(folder).is_dir() else ():
            found.setdefault(path.name, path)
    missing = [file for _, file in names if file not in found]
    if missing:
        raise SystemExit(f"words_set: typefaces not installed: {', '.join(missing)} (see the module docstring)")
    return [found[file] for _, file in names]


def render_word(word: str, face: Path, rng: random.Random) -> Image.Image:
    """The word in black on white, centred with a random offset, size and tilt (+-4 degrees)."""
    scale = 4  # drawn large, then reduced: anti-aliased strokes at 64 px
    canvas = IMAGE_SIZE * scale
    target = rng.uniform(0.70, 0.92) * canvas  # the word's width
    font = ImageFont.truetype(str(face), 40 * scale)
    left, top, right, bottom = font.getbbox(word)
    size = int(40 * scale * min(target / (right - left), 0.5 * canvas / (bottom - top)))
    font = ImageFont.truetype(str(face), size)
    left, top, right, bottom = font.getbbox(word)
    image = Image.new("L", (canvas, canvas), 255)
    slack_x, slack_y = canvas - (right - left), canvas - (bottom - top)
    x = slack_x / 2 + rng.uniform(-0.3, 0.3) * slack_x - left
    y = slack_y / 2 + rng.uniform(-0.3, 0.3) * slack_y - top
    ImageDraw.Draw(image).text((x, y), word, font=font, fill=0)
    image = image.rotate(rng.uniform(-4, 4), resample=Image.BICUBIC, fillcolor=255)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS).convert("RGB")


def speak(word: str, voice: tuple[str, str, int, int]) -> tuple[np.ndarray, int]:
    """espeak-ng's waveform of the word (float32 mono) and its sample rate."""
    accent, variant, pitch, speed = voice
    wav = subprocess.run(["espeak-ng", "-v", f"{accent}+{variant}", "-p", str(pitch), "-s", str(speed),
                          "--stdout", word], check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, rate


def plan(words: list[str], train_faces: list[Path], test_faces: list[Path], seed: int) -> list[Sample]:
    """Every row of every split, in manifest order."""
    samples, n_train, n_test = [], len(train_faces), len(test_faces)
    for w, word in enumerate(words):
        for i in range(n_train):
            samples.append(Sample(word, "train", i, train_faces[i], TRAIN_VOICES[(i + w) % n_train], seed))
        for i in range(VAL_PER_WORD):
            j = (7 * w + 5 * i + 3) % n_train
            samples.append(Sample(word, "val", i, train_faces[j], TRAIN_VOICES[(j + 2 * w + 1) % n_train], seed))
        for i in range(n_test):
            samples.append(Sample(word, "test", i, test_faces[i], TEST_VOICES[(i + w) % len(TEST_VOICES)], seed))
    return samples


def write_sample(root: Path, s: Sample) -> dict:
    rng = random.Random(f"{s.seed}/{s.stem}")
    render_word(s.word, s.face, rng).save(root / "img" / f"{s.stem}.png")
    audio, rate = speak(s.word, s.voice)
    sf.write(root / "wav" / f"{s.stem}.wav", audio, rate)
    return {"image": f"img/{s.stem}.png", "audio": f"wav/{s.stem}.wav", "text": s.word, "label": s.word,
            "typeface": s.face.stem, "voice": "+".join(map(str, s.voice))}


def build(root: Path, n_words: int = len(WORDS), seed: int = 0, workers: int = 4) -> dict[str, int]:
    """Write the set under `root`; returns the number of rows per split."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("words_set: espeak-ng is not installed (apt-get install espeak-ng)")
    if not 1 <= n_words <= len(WORDS):
        raise SystemExit(f"words_set: --words must be in 1..{len(WORDS)}, got {n_words}")
    words = WORDS[:n_words]
    samples = plan(words, find_faces(TRAIN_FACES), find_faces(TEST_FACES), seed)
    for folder in ("img", "wav"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers) as pool:  # espeak-ng runs as a subprocess: threads suffice
        rows = list(pool.map(lambda s: write_sample(root, s), samples))
    counts = {}
    for split in ("train", "val", "test"):
        part = [r for s, r in zip(samples, rows) if s.split == split]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        counts[split] = len(part)
    (root / "labels.txt").write_text("\n".join(words) + "\n")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--words", type=int, default=len(WORDS), help="the first N words of the list")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = build(args.out, args.words, args.seed)
    print(f"{args.out}: " + ", ".join(f"{k} {v} rows" for k, v in counts.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
