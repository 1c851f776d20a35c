"""The shared space and `Model`: unit vectors, input-type invariance, save → load equality, and
open_clip towers configured from YAML reproducing open_clip exactly."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmembed as mm
from mmembed.config import Config, ModelConfig, TokenizerConfig, TowerConfig, from_dict
from mmembed.errors import BadInput, CheckpointError, ConfigError, UserError
from mmembed.model import build_model
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = mm.load_config("demo")
    cfg.model = from_dict(ModelConfig, TINY_MODEL, "model", "test")
    tok = mm.Tokenizer.train(["a large red circle on the left", "a small blue star"] * 20, vocab_size=300)
    return build_model(cfg, tok)


def test_embed_unit_vectors_every_modality(model, tiny_world):
    img = sorted((tiny_world / "images").glob("*.png"))[:3]
    wav = sorted((tiny_world / "audio").glob("*.wav"))[:3]
    for modality, items in [("image", img), ("audio", wav), ("text", ["a", "a small blue star", "x" * 500])]:
        z = model.embed(modality, items)
        assert z.dtype == torch.float32 and z.shape == (3, 32)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))


def test_path_and_pil_give_identical_embeddings(model, tiny_world):
    path = sorted((tiny_world / "images").glob("*.png"))[0]
    a = model.embed("image", [path])
    b = model.embed("image", [Image.open(path)])
    c = model.embed("image", [str(path)])
    assert torch.equal(a, b) and torch.equal(a, c)


def test_waveform_pair_equals_path(model, tiny_world):
    import soundfile as sf

    path = sorted((tiny_world / "audio").glob("*.wav"))[0]
    wav, sr = sf.read(path, dtype="float32")
    torch.testing.assert_close(model.embed("audio", [path]), model.embed("audio", [(wav, sr)]), atol=1e-6, rtol=0)


def test_one_item_without_a_list_is_embedded_as_one(model, tiny_world):
    """A path, raw bytes or a (waveform, rate) pair given alone is one item, as in a list of one
    (bytes and the pair are sequences: they were taken apart into "items")."""
    import soundfile as sf

    image = sorted((tiny_world / "images").glob("*.png"))[0]
    sound = sorted((tiny_world / "audio").glob("*.wav"))[0]
    wav, sr = sf.read(sound, dtype="float32")
    for modality, item in [("image", image), ("image", image.read_bytes()), ("audio", sound.read_bytes()),
                           ("audio", (wav, sr)), ("text", "a small blue star")]:
        assert torch.equal(model.embed(modality, item), model.embed(modality, [item])), (modality, type(item))
    assert model.embed("image", (image, image)).shape == (2, 32)  # a tuple of items is still items


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_a_batch_size_below_one_is_one_clear_error(model, batch_size):
    with pytest.raises(UserError, match="batch_size must be an integer >= 1"):  # -1 returned no vectors
        model.embed("text", ["a", "b"], batch_size=batch_size)


def test_batched_equals_single(model):
    texts = ["a large red circle on the left", "a small blue star", "two objects"]
    batched = model.embed("text", texts)
    single = torch.cat([model.embed("text", [t]) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_save_load_identical(model, tmp_path):
    model.save(tmp_path / "run")
    back = mm.load(tmp_path / "run")
    texts = ["a large red circle on the left"]
    assert torch.equal(model.embed("text", texts), back.embed("text", texts))
    assert back.fingerprint == model.fingerprint


def test_a_run_missing_its_tokenizer_is_one_clear_error(model, tmp_path):
    """It used to be "TypeError: TextTransformer.__init__() missing 1 required positional argument"."""
    model.save(tmp_path / "run")
    (tmp_path / "run" / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'run'))}: model\.towers\.text: the "
                                          r"text_transformer encoder needs a tokenizer .*tokenizer\.json\)$"):
        mm.load(tmp_path / "run")


def test_unknown_modality_and_bad_item_are_clear(model, tmp_path):
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        model.embed("video", ["x"])
    (tmp_path / "bad.png").write_text("<html>not an image</html>")
    with pytest.raises(BadInput, match="image item 1"):
        model.embed("image", [Image.new("RGB", (40, 40)), tmp_path / "bad.png"])


def test_logit_scale_clamped_on_read():
    from mmembed.space import SharedSpace, Tower, build_head

    enc = torch.nn.Linear(2, 2)
    space = SharedSpace({mm.Modality.TEXT: Tower(enc, build_head("linear", 2, 2))}, 2, init_logit_scale=500.0)
    assert space.logit_scale.item() == pytest.approx(100.0)
    space.clamp_()
    assert space.log_logit_scale.exp().item() == pytest.approx(100.0)



def test_a_logit_scale_at_its_bound_can_still_come_down():
    """At the bound the scale reads 100 but its gradient is exp's (straight through), so a loss that
    wants a lower scale lowers it (a clamp's zero gradient there held it at 100 for good)."""
    from mmembed.space import SharedSpace, Tower, build_head

    space = SharedSpace({mm.Modality.TEXT: Tower(torch.nn.Linear(2, 2), build_head("linear", 2, 2))}, 2,
                        init_logit_scale=100.0)
    opt = torch.optim.SGD([space.log_logit_scale], lr=1e-4)
    opt.zero_grad()
    space.logit_scale.backward()  # a loss that falls with the scale
    assert space.log_logit_scale.grad.item() == pytest.approx(100.0, rel=1e-5)
    opt.step()
    space.clamp_()
    assert space.logit_scale.item() == pytest.approx(100.0 * math.exp(-1e-2), rel=1e-5)

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def test_open_clip_towers_from_config_equal_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    (tmp_path / "mmembed-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "mmembed-tiny-clip.json")
    torch.manual_seed(0)
    ref = open_clip.create_model("mmembed-tiny-clip").eval()
    torch.save(ref.state_dict(), tmp_path / "clip.pt")

    args = {"arch": "mmembed-tiny-clip", "pretrained": str(tmp_path / "clip.pt")}
    cfg = Config(model=ModelConfig(embed_dim=32, towers={
        "image": TowerConfig(encoder="open_clip_image", encoder_args=args, head="none", preprocess={"size": 32}),
        "text": TowerConfig(encoder="open_clip_text", encoder_args=args, head="none", preprocess={"max_length": 77}),
    }), tokenizer=TokenizerConfig(kind="clip"))
    from mmembed.tokenizer import load_tokenizer

    model = build_model(cfg, load_tokenizer("clip"))
    model.space.eval()
    images = torch.randn(2, 3, 32, 32)
    texts = ["a photo of a cat", "a diagram"]
    ids = open_clip.get_tokenizer("mmembed-tiny-clip")(texts)
    with torch.no_grad():
        torch.testing.assert_close(model.space.encode("image", images), F.normalize(ref.encode_image(images), dim=-1),
                                   atol=1e-6, rtol=0)
        ours_text = model.embed("text", texts)
        torch.testing.assert_close(ours_text, F.normalize(ref.encode_text(ids), dim=-1), atol=1e-6, rtol=0)
    model.save(tmp_path / "run")
    back = mm.load(tmp_path / "run")
    assert torch.equal(back.embed("text", texts), ours_text)


def test_init_from_a_run_whose_tower_does_not_fit_is_named(tmp_path, caplog):
    """init_towers=[image, txet] loaded the image tower alone, and a frozen text tower of another
    depth loaded 29 of its 42 tensors: both trained on, random where nothing fit, without a word."""
    import copy
    import logging

    from mmembed.checkpoint import save_tensors
    from mmembed.space import build_space, init_from_run

    source = build_space(from_dict(ModelConfig, TINY_MODEL, "model", "test"), vocab_size=300)
    save_tensors(tmp_path / "model.safetensors", source.state_dict())
    deeper = copy.deepcopy(TINY_MODEL)
    deeper["towers"]["text"]["encoder_args"]["layers"] = 2
    target = build_space(from_dict(ModelConfig, deeper, "model", "test"), vocab_size=300)
    with pytest.raises(UserError, match="txet is not a tower of this model"):
        init_from_run(target, tmp_path / "model.safetensors", ["image", "txet"])
    with pytest.raises(UserError, match=r"the text tower of .* fits \d+ of its \d+ tensors here"):
        init_from_run(target, tmp_path / "model.safetensors", ["image", "text"])
    with pytest.raises(UserError, match="it is frozen"):
        init_from_run(target, tmp_path / "model.safetensors", None, frozenset({"text"}))
    with caplog.at_level(logging.WARNING):
        init_from_run(target, tmp_path / "model.safetensors", None)
    assert "the text tower" in caplog.text and "start fresh" in caplog.text
    for k, v in source.state_dict().items():
        if k.startswith("towers.image."):
            torch.testing.assert_close(target.state_dict()[k], v, atol=0, rtol=0)


def test_init_from_a_run_whose_tower_has_more_than_this_one_is_named(tmp_path):
    """A tower of the source run with tensors this config lacks (the demo's pool: flatten map
    into configs/bind-audio.yaml's pool: mean) loaded every tensor it had and dropped the rest:
    a frozen tower that computed something else than the run's, without a word."""
    import copy

    from mmembed.checkpoint import save_tensors
    from mmembed.space import build_space, init_from_run

    deeper = copy.deepcopy(TINY_MODEL)
    deeper["towers"]["text"]["encoder_args"]["layers"] = 2
    save_tensors(tmp_path / "model.safetensors",
                 build_space(from_dict(ModelConfig, deeper, "model", "test"), vocab_size=300).state_dict())
    target = build_space(from_dict(ModelConfig, TINY_MODEL, "model", "test"), vocab_size=300)
    with pytest.raises(UserError, match=r"the text tower of .* has tensors this config's lacks \(towers\.text\."):
        init_from_run(target, tmp_path / "model.safetensors", ["image", "text"])
    with pytest.raises(UserError, match="it is frozen"):
        init_from_run(target, tmp_path / "model.safetensors", None, frozenset({"text"}))


def test_a_frozen_tower_the_run_does_not_load_is_refused(tmp_path):
    """A frozen tower that init_from left out (init_towers=[image] with text frozen) or that the run lacks
    stayed at its random initialisation, frozen, with no word."""
    import copy

    from mmembed.checkpoint import save_tensors
    from mmembed.space import build_space, init_from_run

    full = from_dict(ModelConfig, TINY_MODEL, "model", "test")
    save_tensors(tmp_path / "full.safetensors", build_space(full, vocab_size=300).state_dict())
    no_audio = copy.deepcopy(TINY_MODEL)
    del no_audio["towers"]["audio"]
    save_tensors(tmp_path / "no_audio.safetensors",
                 build_space(from_dict(ModelConfig, no_audio, "model", "test"), vocab_size=300).state_dict())
    target = build_space(full, vocab_size=300)
    with pytest.raises(UserError, match=r"init_towers=\['image'\]: the text tower is frozen and model\.init_towers "
                                        r"leaves it out: it would stay as initialised; load it \(add it to "
                                        r"model\.init_towers\)"):
        init_from_run(target, tmp_path / "full.safetensors", ["image"], frozenset({"image", "text"}))
    with pytest.raises(UserError, match=r"no_audio\.safetensors has no audio tower: .*from a run that has it"):
        init_from_run(target, tmp_path / "no_audio.safetensors", None, frozenset({"audio"}))
    init_from_run(target, tmp_path / "full.safetensors", ["image", "text"], frozenset({"image", "text"}))
    init_from_run(target, tmp_path / "no_audio.safetensors", None, frozenset({"text"}))  # audio trains: fine
    # built from pretrained weights of its own, a frozen tower may take none from the run
    init_from_run(target, tmp_path / "no_audio.safetensors", None, frozenset({"audio"}), frozenset({"audio"}))
    deeper = copy.deepcopy(TINY_MODEL)  # but one the run loads in part is still refused: a mix of two models
    deeper["towers"]["text"]["encoder_args"]["layers"] = 2
    target = build_space(from_dict(ModelConfig, deeper, "model", "test"), vocab_size=300)
    with pytest.raises(UserError, match="it is frozen"):
        init_from_run(target, tmp_path / "full.safetensors", None, frozenset({"text"}), frozenset({"text"}))


def test_the_bind_recipe_keeps_the_demo_towers_it_loads():
    """configs/bind-audio.yaml kept pool: mean after the demo's image tower moved to pool: flatten."""
    import yaml

    from mmembed.config import CONFIG_DIR

    demo = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())["model"]
    bind = yaml.safe_load((CONFIG_DIR / "bind-audio.yaml").read_text())["model"]
    for name in bind["init_towers"]:
        ours = {k: v for k, v in bind["towers"][name].items() if k != "freeze"}
        assert ours == {k: v for k, v in demo["towers"][name].items() if k != "freeze"}, name


def _tiny_clip_config(tmp_path, image_preprocess: dict) -> Config:
    """Tiny open_clip towers from a local-dir: folder, started from a weights file in tmp_path."""
    from safetensors.torch import save_file

    open_clip = pytest.importorskip("open_clip")
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.manual_seed(0)
    ref = open_clip.create_model(f"local-dir:{arch}")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "start.safetensors"))
    args = {"arch": f"local-dir:{arch}", "pretrained": str(tmp_path / "start.safetensors")}
    return Config(model=ModelConfig(embed_dim=32, towers={
        "image": TowerConfig(encoder="open_clip_image", encoder_args=args, head="none", preprocess=image_preprocess),
        "text": TowerConfig(encoder="open_clip_text", encoder_args=args, head="none", preprocess={"max_length": 77}),
    }), tokenizer=TokenizerConfig(kind="clip"))


def test_a_run_loads_after_the_pretrained_file_it_started_from_moved(tmp_path):
    """mm.load re-read the run's pretrained file: once moved, 'weights file not found'."""
    from mmembed.tokenizer import load_tokenizer

    model = build_model(_tiny_clip_config(tmp_path, {"size": 32}), load_tokenizer("clip"))
    with torch.no_grad():  # trained weights differ from the file started from
        for p in model.space.parameters():
            p.add_(0.01)
    model.space.eval()
    model.save(tmp_path / "run")
    (tmp_path / "start.safetensors").rename(tmp_path / "moved.safetensors")
    back = mm.load(tmp_path / "run")
    texts, images = ["a photo of a cat", "a diagram"], torch.randn(2, 3, 32, 32)
    assert torch.equal(back.embed("text", texts), model.embed("text", texts))
    with torch.no_grad():
        assert torch.equal(back.space.encode("image", images), model.space.encode("image", images))


@pytest.mark.parametrize("preprocess, match", [
    ({"size": 64}, r"takes preprocess \{size: 32\}, not \{size: 64\}"),  # was a RuntimeError at embed time
    ({}, r"takes preprocess \{size: 32\}, not \{size: 224\}"),  # the preprocessor's default size
])
def test_image_preprocessing_that_a_pretrained_tower_does_not_take_is_refused(tmp_path, preprocess, match):
    """The open_clip tower's preprocess_cfg was never read: size 64 on a 32 px tower failed inside it."""
    from mmembed.tokenizer import load_tokenizer

    with pytest.raises(ConfigError, match=r"model\.towers\.image: the tower " + match):
        build_model(_tiny_clip_config(tmp_path, preprocess), load_tokenizer("clip"))


def _image_arch(tmp_path, preprocess_cfg: dict | None = None) -> str:
    """A local-dir: architecture of TINY_CLIP (its json holding `preprocess_cfg`, as a hub model's may)."""
    arch = tmp_path / "image-arch"
    arch.mkdir(exist_ok=True)
    extra = {"preprocess_cfg": preprocess_cfg} if preprocess_cfg else {}
    (arch / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP} | extra))
    return f"local-dir:{arch}"


def _image_tower(arch: str, pretrained: str | None, preprocess: dict) -> ModelConfig:
    args = {"arch": arch, "pretrained": pretrained}
    return ModelConfig(embed_dim=32, towers={
        "image": TowerConfig(encoder="open_clip_image", encoder_args=args, head="none", preprocess=preprocess)})


@pytest.mark.parametrize("start", ["random", "file"])
def test_a_tower_not_from_a_tag_takes_any_mean_and_std(tmp_path, start):
    """A random tower, or one from a weights file, was refused any mean/std but open_clip's default
    CLIP one, blaming a "pretrained tower" (a SigLIP file needs 0.5): such runs could not resume."""
    from mmembed.space import build_space

    open_clip = pytest.importorskip("open_clip")
    arch, pretrained = _image_arch(tmp_path), None
    if start == "file":
        from safetensors.torch import save_file

        pretrained = str(tmp_path / "start.safetensors")
        save_file({k: v.contiguous() for k, v in open_clip.create_model(arch).state_dict().items()}, pretrained)
    siglip = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    space = build_space(_image_tower(arch, pretrained, siglip))
    assert "mean" not in space.towers["image"].encoder.preprocess_cfg
    with pytest.raises(ConfigError, match=r"model\.towers\.image: the tower takes preprocess \{size: 32\}, "
                                          r"not \{size: 64\}"):  # the size is checked all the same
        build_space(_image_tower(arch, pretrained, siglip | {"size": 64}))


def test_a_tower_from_a_tag_takes_the_tags_mean_and_std(tmp_path, monkeypatch):
    """The tag's mean and std are still checked (a SigLIP tag's tower was fed CLIP's): a tag simulated
    offline by a local-dir: folder whose preprocess_cfg open_clip reads as it reads a tag's."""
    import encoders.open_clip_towers as open_clip_towers
    from mmembed.space import build_space

    open_clip = pytest.importorskip("open_clip")
    create = open_clip.create_model
    monkeypatch.setattr(open_clip_towers, "_resolve_pretrained", lambda name, pretrained: (None, pretrained))
    monkeypatch.setattr(open_clip, "create_model",
                        lambda name, **kw: create(name, **kw | {"pretrained": None, "load_weights": False}))
    siglip = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    with pytest.raises(ConfigError, match=r"the tower takes preprocess \{mean: \[0.5, 0.5, 0.5\], std: \[0.5, 0.5, "
                                          r"0.5\]\}, not \{mean: \[0.48145466, "):
        build_space(_image_tower(_image_arch(tmp_path, siglip), "webli", {"size": 32}))
    space = build_space(_image_tower(_image_arch(tmp_path, siglip), "webli", siglip))
    assert list(space.towers["image"].encoder.preprocess_cfg["mean"]) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("spoil, match", [
    (lambda t: t.long(), "holds torch.int64 values where a floating tensor belongs"),
    (lambda t: t > 0, "holds torch.bool values"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "holds NaN or infinite values"),
])
def test_a_runs_weights_of_integer_or_nan_values_are_refused(model, tmp_path, spoil, match):
    """load_state_dict cast integer and bool tensors to float, and NaN loaded as is: all embedded."""
    from safetensors.torch import load_file, save_file

    model.save(tmp_path / "run")
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    key = next(k for k in sorted(state) if k.startswith("towers.text.") and k.endswith("weight") and state[k].ndim == 2)
    state[key] = spoil(state[key])
    save_file(state, str(tmp_path / "run" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{key} {match}"):
        mm.load(tmp_path / "run")
    from mmembed.space import build_space, init_from_run

    target = build_space(from_dict(ModelConfig, TINY_MODEL, "model", "test"), vocab_size=model.tokenizer.vocab_size)
    with pytest.raises(UserError, match=f"{key} {match}"):
        init_from_run(target, tmp_path / "run" / "model.safetensors", None)
