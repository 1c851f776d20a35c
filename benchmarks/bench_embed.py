"""B-embed: embedding inference per tower at batch 32, ours vs open_clip on the same towers.

    python -m benchmarks.bench_embed            # a small custom CLIP and ViT-B-32
    python -m benchmarks.bench_embed --quick    # the small custom CLIP only

Per architecture, a random open_clip `CLIP` (the anchor) is saved to a local weights file and
our `open_clip_image` / `open_clip_text` encoders load it — the path a user takes — inside a
`SharedSpace` with `head: none`. Rows (`ratio` = ours / anchor throughput, > 1: ours faster):

- `tower image` / `tower text`: preprocessed tensors in, unit vectors out, under
  `torch.inference_mode()`: `space.encode(m, x, mask)` vs `encode_image(x, normalize=True)` /
  `encode_text(ids, normalize=True)`. Ours receives what our pipeline produces — ids padded to
  the longest caption of the batch plus a mask — the anchor open_clip's (B, 77) ids.
  `max_abs_diff` checks that the vectors are the same: a row is `correct` when it is at most
  TOLERANCE = 1e-5 (2e-7 measured; PIL_TOLERANCE = 1e-3 for the `embed image` rows, whose resize
  code differs: 4e-5 to 1.5e-4 measured). Both towers are open_clip's modules with
  the same weights, but ours skips what the pooled vector cannot depend on (see
  `encoders/open_clip_towers.py`): text positions after the last EOT of the batch (causal
  mask), and the ViT's last block at the patch positions (class-token pooling). So the vectors
  agree within float rounding (~1e-7), not bit for bit, and the ratio is that saving, the
  faster linear kernels our towers use (oneDNN where torch's MKL takes a generic path, as on AMD
  processors: `encoders/linear.py`; open_clip's modules keep F.linear) and our wrapper's overhead.
- `text at full context (info)`: captions long enough to fill the 77-token context, so no
  position can be skipped: both sides run the same text transformer over 77 positions, and the
  ratio is the linear kernels and our wrapper's overhead (1.0 with `MMEMBED_ONEDNN=0`; 1.26 with
  oneDNN on the 2-core AMD EPYC, 2026-12-06, a review's 7 interleaved rounds).
- `embed image` / `embed text`: end to end from raw PIL images and strings, `Model.embed`
  (our preprocessing + tokenizer + tower) vs open_clip's eval `preprocess` + tokenizer + encode.
- `own towers`: mmembed's own `vit` / `text_transformer` (same width, depth, heads, patch and
  image size; causal text; linear heads) vs the same open_clip encode, as extra information.

Each figure is the median of interleaved repeats after a warm-up call; 2 threads, fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from benchmarks.bench_train import interleaved_times, timing_stats
from benchmarks.common import ratio_report, setup
from mmembed.clip_tokenizer import ClipTokenizer
from mmembed.config import Config, ModelConfig, TokenizerConfig, TowerConfig
from mmembed.modality import Modality
from mmembed.model import Model, build_model
from mmembed.space import SharedSpace, Tower, build_head

BATCH = 32
TOLERANCE = 1e-5  # max_abs_diff of a correct row: float rounding, 2e-7 measured (ViT-B-32 and the small one)
PIL_TOLERANCE = 1e-3  # embed image rows: two resize implementations; 4e-5 to 1.5e-4 measured
SMALL = "mmembed-bench-small"
SMALL_CFG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
WORDS = ("a red circle on the left of a small blue square near green triangle above big yellow star "
         "photo of dog cat sitting beside wooden table under bright light with two three people").split()


def inputs(image_size: int, seed: int = 0, words: tuple[int, int] = (3, 20)) -> tuple[list[Image.Image], list[str]]:
    """BATCH random RGB photos larger than the tower's input, and BATCH captions of `words` (3-20) words."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    h, w = image_size * 3 // 2, image_size * 2
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(BATCH)]
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(BATCH)]
    return images, captions


def our_text_ids(model: Model, captions: list[str]) -> tuple[Tensor, Tensor]:
    """What `Model.embed` hands the text tower: ids (B, T_max) and mask (B, T_max)."""
    pre = model.preprocessors[Modality.TEXT]
    return pre.collate([pre(c) for c in captions])


def our_model(arch: str, weights: Path, cfg: dict) -> Model:
    """A `Model` whose towers are our open_clip encoders reading `weights`, heads `none`."""
    size = cfg["vision_cfg"]["image_size"]
    args = {"arch": arch, "pretrained": str(weights)}
    towers = {
        "image": TowerConfig("open_clip_image", dict(args), {"size": size}, head="none"),
        "text": TowerConfig("open_clip_text", dict(args), {"max_length": 77, "add_bos": True, "add_eos": True},
                            head="none"),
    }
    config = Config(model=ModelConfig(embed_dim=cfg["embed_dim"], towers=towers),
                    tokenizer=TokenizerConfig(kind="clip"))
    model = build_model(config, ClipTokenizer())
    model.space.eval()
    return model


def own_towers(cfg: dict) -> SharedSpace:
    """mmembed's own ViT and text transformer in the shape of open_clip config `cfg`."""
    from encoders import ENCODERS

    v, t, d = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vit = ENCODERS["vit"](image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
                          layers=v["layers"], heads=v["width"] // v.get("head_width", 64), pool="cls")
    text = ENCODERS["text_transformer"](vocab_size=t["vocab_size"], width=t["width"], layers=t["layers"],
                                        heads=t["heads"], max_len=t["context_length"], pool="last", causal=True)
    towers = {Modality.IMAGE: Tower(vit, build_head("linear", v["width"], d)),
              Modality.TEXT: Tower(text, build_head("linear", t["width"], d))}
    return SharedSpace(towers, d).eval()


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """open_clip warns on the root logger for every randomly initialised model: expected here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def timed(fns: dict[str, Callable[[], Tensor]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn in every round, timed interleaved under inference_mode."""
    with torch.inference_mode():
        return interleaved_times(fns, rounds=repeats, warmup=1)


def row(name: str, times: dict[str, list[float]], ours: str = "ours", **extra) -> dict:
    stats = timing_stats({k: times[k] for k in (ours, "anchor")}, ours=ours)
    sec = stats["seconds"]
    return ratio_report(name, BATCH / sec[ours], BATCH / sec["anchor"], "items/s", higher_is_better=True,
                        batch=BATCH, **stats, **extra)


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def checked(diff: float, tolerance: float = TOLERANCE) -> dict:
    """A row's `max_abs_diff` and its verdict: `correct` when within `tolerance`."""
    return {"correct": diff <= tolerance, "correct_if": f"max_abs_diff <= {tolerance:g}", "max_abs_diff": diff}


def bench_arch(arch: str, cfg: dict, folder: Path, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    with quiet_open_clip():
        clip = open_clip.create_model(arch).eval()
    weights = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    with quiet_open_clip():
        model = our_model(arch, weights, cfg)
    space, own = model.space, own_towers(cfg)
    size = cfg["vision_cfg"]["image_size"]
    images, captions = inputs(size)
    preprocess = open_clip.image_transform(size, is_train=False)
    tokenize = open_clip.get_tokenizer(arch)

    x = torch.stack([preprocess(im) for im in images])  # (B, 3, S, S)
    ids77 = tokenize(captions)  # (B, 77)
    ours_ids, ours_mask = our_text_ids(model, captions)  # (B, T_max)
    long_captions = inputs(size, seed=1, words=(80, 90))[1]  # each fills the 77-token context
    long77 = tokenize(long_captions)
    long_ids, long_mask = our_text_ids(model, long_captions)  # (B, 77)
    with torch.inference_mode():
        ref_img, ref_txt = clip.encode_image(x, normalize=True), clip.encode_text(ids77, normalize=True)
        diffs = {"image": max_diff(space.encode("image", x), ref_img),
                 "text": max_diff(space.encode("text", ours_ids, ours_mask), ref_txt),
                 "embed image": max_diff(model.embed("image", images), ref_img),
                 "embed text": max_diff(model.embed("text", captions), ref_txt),
                 "full context": max_diff(space.encode("text", long_ids, long_mask),
                                          clip.encode_text(long77, normalize=True))}

    t_img = timed({"ours": lambda: space.encode("image", x), "anchor": lambda: clip.encode_image(x, normalize=True),
                     "own": lambda: own.encode("image", x)}, repeats)
    t_txt = timed({"ours": lambda: space.encode("text", ours_ids, ours_mask),
                     "anchor": lambda: clip.encode_text(ids77, normalize=True),
                     "own": lambda: own.encode("text", ours_ids, ours_mask)}, repeats)
    t_e_img = timed({"ours": lambda: model.embed("image", images),
                       "anchor": lambda: clip.encode_image(torch.stack([preprocess(im) for im in images]),
                                                           normalize=True)}, repeats)
    t_e_txt = timed({"ours": lambda: model.embed("text", captions),
                       "anchor": lambda: clip.encode_text(tokenize(captions), normalize=True)}, repeats)
    t_full = timed({"ours": lambda: space.encode("text", long_ids, long_mask),
                    "anchor": lambda: clip.encode_text(long77, normalize=True)}, repeats)
    tag = f"B-embed {arch}"
    return [
        row(f"{tag} tower image", t_img, **checked(diffs["image"])),
        row(f"{tag} tower text", t_txt, **checked(diffs["text"]), tokens={"ours": ours_ids.shape[1], "anchor": 77}),
        row(f"{tag} embed image (from PIL)", t_e_img, **checked(diffs["embed image"], PIL_TOLERANCE),
            image_in=list(images[0].size)),
        row(f"{tag} embed text (from str)", t_e_txt, **checked(diffs["embed text"])),
        row(f"{tag} text at full context (info)", t_full, **checked(diffs["full context"]),
            tokens={"ours": long_ids.shape[1], "anchor": 77},
            note="every caption fills the context: same positions on both sides; the linear kernels "
                 "(oneDNN vs F.linear) and the wrapper's overhead"),
        row(f"{tag} own vit", t_img, ours="own", note="mmembed's own ViT + linear head, same shape (info)"),
        row(f"{tag} own text_transformer", t_txt, ours="own",
            note="mmembed's own causal text transformer + linear head, same shape, T_max tokens (info)"),
    ]


def run(quick: bool = False, archs: dict[str, dict] | None = None, repeats: int | None = None) -> dict:
    """Run B-embed. `quick`: the small custom architecture only, fewer repeats. `archs` maps
    open_clip architecture names to their configs (custom names are registered from them);
    `repeats` overrides the number of timed calls per contestant."""
    setup(threads=2, seed=0)
    if archs is None:
        archs = {SMALL: SMALL_CFG} if quick else {SMALL: SMALL_CFG, "ViT-B-32": open_clip.get_model_config("ViT-B-32")}
    # ViT-B-32 costs seconds per call on 2 cores: fewer repeats of it
    plan = {arch: repeats or (7 if quick else 5 if arch == "ViT-B-32" else 11) for arch in archs}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch, cfg in archs.items():
            if open_clip.get_model_config(arch) is None:  # a custom architecture: open_clip reads JSON
                (folder / f"{arch}.json").write_text(json.dumps(cfg))
                open_clip.add_model_config(folder / f"{arch}.json")
            rows += bench_arch(arch, cfg, folder, plan[arch])
    return {
        "benchmark": "B-embed",
        "goal": "ratio >= 1.0 for the tower rows (ratio = our items/s / open_clip items/s)",
        "batch": BATCH,
        "timing": "median of interleaved repeats after one warm-up call, inference_mode, fp32, 2 threads",
        "repeats": plan,
        "notes": [
            "Our open_clip_text tower runs only the positions up to the batch's last EOT (causal mask, EOT "
            "pooling: the later ones cannot change the result), open_clip all 77 of the context; our "
            "open_clip_image tower runs the ViT's last block at the class token only. Same vectors within "
            "float rounding (max_abs_diff ~1e-7).",
            "text at full context rows: no position can be skipped, so both run the same work; their ratio "
            "is our linear kernels' (oneDNN where MKL is generic, encoders/linear.py) and the wrapper's "
            "overhead (about 1.0 with MMEMBED_ONEDNN=0).",
            "embed image rows: ours and open_clip resize with different code paths (max_abs_diff ~1e-4).",
        ],
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small custom architecture only")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
