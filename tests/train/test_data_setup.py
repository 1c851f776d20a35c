"""What a run checks before its first step: a manifest without pairs or without captions is named
as such, before (and instead of) advice about the tokenizer; a tower left out needs none."""

import hashlib
import json
from pathlib import Path, PurePath

import pytest

from mmembed.config import load_config
from mmembed.data.loader import SkipCounter
from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.tokenizer import Tokenizer
from mmembed.train.align import train_align
from mmembed.train.align_data import train_loader_factory
from mmembed.data.manifest import Manifest, Row, read_manifest
from mmembed.train.data_setup import prepare_tokenizer, read_train_manifest, rows_fingerprint
from tests.conftest import tiny_config


def _world_of(tiny_world, tmp_path, columns: tuple[str, ...], absolute: int = 0):
    """`tiny_world` whose training rows keep only `columns`, the images of `rows[:absolute]` given by
    absolute path (refused at read time); and its row count."""
    world = tmp_path / "world"
    world.mkdir()
    for entry in tiny_world.iterdir():
        (world / entry.name).symlink_to(entry)
    rows = [json.loads(line) for line in (tiny_world / "train.jsonl").read_text().splitlines()]
    for r in rows[:absolute]:
        r["image"] = str(tiny_world / r["image"])
    (world / "train.jsonl").unlink()
    (world / "train.jsonl").write_text("".join(json.dumps({c: r[c] for c in columns}) + "\n" for r in rows))
    return world, len(rows)


def test_a_manifest_without_pairs_is_named_before_the_tokenizer(tiny_world, tmp_path):
    """An image-only manifest said "no captions ... set tokenizer.path", hiding that it has no pair."""
    world, _ = _world_of(tiny_world, tmp_path, ("image",))
    cfg = load_config(tiny_config(world, tmp_path / "run"))
    with pytest.raises(UserError, match=r"no row has two of the modalities .*rows have: image\): no pair"):
        prepare_tokenizer(cfg, world, None)


@pytest.mark.parametrize("given_tokenizer", [False, True])
def test_a_manifest_without_captions_names_the_text_tower(tiny_world, tmp_path, given_tokenizer):
    """Image+audio rows said "set tokenizer.path", which then trained a text tower on no caption."""
    world, _ = _world_of(tiny_world, tmp_path, ("image", "audio"))
    Tokenizer.train(["a red circle", "a blue square"], vocab_size=300).save(tmp_path / "tokenizer.json")
    overrides = [f"tokenizer.path={tmp_path / 'tokenizer.json'}"] if given_tokenizer else []
    cfg = load_config(tiny_config(world, tmp_path / "run"), overrides)
    with pytest.raises(UserError, match=r"no row has a caption .* for the text tower to learn from: leave the "
                                        r"text tower out with model.towers.text=null$") as e:
        prepare_tokenizer(cfg, world, None)
    assert "tokenizer.path" not in str(e.value)


def test_a_frozen_text_tower_needs_no_caption_but_its_runs_tokenizer(tiny_world, tmp_path):
    """The bind-audio recipe (image+audio rows, the text tower frozen from another run) was refused for
    having no caption, with advice that dropped the very tower audio->text retrieval goes through."""
    world, _ = _world_of(tiny_world, tmp_path, ("image", "audio"))
    Tokenizer.train(["a red circle", "a blue square"], vocab_size=300).save(tmp_path / "tokenizer.json")
    frozen = ["model.towers.text.freeze=true"]
    cfg = load_config(tiny_config(world, tmp_path / "run"), [*frozen, f"tokenizer.path={tmp_path / 'tokenizer.json'}"])
    assert prepare_tokenizer(cfg, world, None).vocab_size == Tokenizer.load(tmp_path / "tokenizer.json").vocab_size
    with pytest.raises(UserError, match=r"the frozen text tower needs the tokenizer of the run it comes from "
                                        r"\(tokenizer.path=RUN/tokenizer.json\)$"):
        prepare_tokenizer(load_config(tiny_config(world, tmp_path / "run"), frozen), world, None)


def test_a_run_without_a_text_tower_trains_without_captions(tiny_world, tmp_path):
    """`model.towers.text=null` was "model.towers.text must be a mapping, got null": no tower could be
    left out from the command line, so an image+audio manifest could not be trained on."""
    world, _ = _world_of(tiny_world, tmp_path, ("image", "audio"))
    cfg = load_config(tiny_config(world, tmp_path / "run", epochs=1), ["model.towers.text=null"])
    assert set(cfg.model.towers) == {"image", "audio"}
    assert prepare_tokenizer(cfg, world, None) is None
    run = train_align(cfg)
    assert (run / "model.safetensors").is_file() and not (run / "tokenizer.json").exists()


def test_too_few_rows_for_a_batch_counts_the_skipped_ones(tiny_world, tmp_path):
    """"training manifest has 3 rows, fewer than train.batch_size=16" of a manifest of many rows,
    most refused (absolute paths), without a word about them."""
    world, n = _world_of(tiny_world, tmp_path, ("image", "audio", "text"), absolute=-3)
    cfg = load_config(tiny_config(world, tmp_path / "run"))
    tok = Tokenizer.train(["a red circle", "a blue square"], vocab_size=300)
    with pytest.raises(UserError, match=rf"training manifest has 3 usable rows of {n} \({n - 3} skipped; first, "
                                        r"line 1: absolute path '.*' refused .*\), fewer than train.batch_size=16: "
                                        r"set a smaller one \(train.batch_size=2\), or give more rows$"):
        train_loader_factory(cfg, world, tok, [Modality.IMAGE, Modality.TEXT], SkipCounter())


def test_too_few_rows_for_a_batch_is_refused_before_the_tokenizer_is_trained(tiny_world, tmp_path, monkeypatch):
    """The README's own-data command (the demo's batch of 128) on 47 rows failed once the tokenizer was trained,
    and without saying what to change."""
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run"), ["train.batch_size=4096"])
    n = len(read_train_manifest(cfg, tiny_world).rows)
    monkeypatch.setattr("mmembed.train.align.prepare_tokenizer", lambda *a, **k: pytest.fail("tokenizer trained"))
    with pytest.raises(UserError, match=rf"training manifest has {n} rows, fewer than train.batch_size=4096: set a "
                                        rf"smaller one \(train.batch_size={2 ** (n.bit_length() - 1)}\)"):
        train_align(cfg)
    assert not (tmp_path / "run").exists() or {p.name for p in (tmp_path / "run").iterdir()} <= {".lock"}


def test_the_tokenizer_is_made_from_the_manifest_read_once(tiny_world, tmp_path, monkeypatch):
    """Tokenizer setup read data.train itself, and the training loader read it again (2 x 29 s at 1M rows)."""
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run"))
    manifest = read_train_manifest(cfg, tiny_world)
    own = prepare_tokenizer(cfg, tiny_world, None)
    reads = []
    monkeypatch.setattr("mmembed.data.read_manifest", lambda *a, **k: reads.append(a) or read_manifest(*a, **k))
    given = prepare_tokenizer(cfg, tiny_world, None, manifest)
    assert reads == []
    texts = ["a large red circle on the left", "a small blue star"]
    assert given.vocab_size == own.vocab_size and [given.encode(t) for t in texts] == [own.encode(t) for t in texts]


def test_a_run_reads_its_training_manifest_once(tiny_world, tmp_path, monkeypatch):
    """A run read data.train for its tokenizer, then again for its loader: 2 x 29 s at 1M rows."""
    import mmembed.train.align_data as align_data

    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", max_steps=1))
    reads = []

    def counted(path, *a, **k):
        reads.append(Path(path).name)
        return read_manifest(path, *a, **k)

    monkeypatch.setattr("mmembed.data.read_manifest", counted)
    monkeypatch.setattr(align_data, "read_manifest", counted)
    train_align(cfg)
    assert reads.count("train.jsonl") == 1 and reads.count("val.jsonl") == 1


def _old_rows_fingerprint(manifest) -> str:
    """rows_fingerprint as it was (Path.relative_to per item): what checkpoints hold."""
    def item(value) -> str:
        return str(value.relative_to(manifest.root)) if isinstance(value, Path) and value.is_relative_to(
            manifest.root) else str(value)

    digest = hashlib.sha256()
    for row in manifest.rows:
        digest.update(repr((row.line, sorted((str(m), item(v)) for m, v in row.items.items()))).encode())
    return digest.hexdigest()[:16]


_TRICKY = ["/data/root/a.png", "/data/root", "/data/root/", "/data/rootx/a.png", "/data/root/../etc/x.png",
           "/data/other/a.png", "rel/a.png", "data/root/a.png", "//data/root/a.png", "/", "C:\\data\\a.png",
           "/data/root/C:\\x.png", "/data/root//sub/./b.png", "/data/root/sub/"]


@pytest.mark.parametrize("root", ["/data/root", "/data/root/", "/", "//data/root", "data/root", ".", "/data"])
def _path_calls(monkeypatch) -> list:
    """The calls of Path.relative_to (is_relative_to's included) from now on."""
    calls = []
    for name in ("relative_to", "is_relative_to"):
        monkeypatch.setattr(PurePath, name, lambda *a, _f=getattr(PurePath, name): calls.append(a) or _f(*a))
    return calls


@pytest.mark.parametrize("root", ["/data/root", "/data/root/", "/", "//data/root", "data/root", ".", "/data"])
def test_rows_fingerprint_is_the_old_one_without_path_methods(root, monkeypatch):
    """rows_fingerprint spent ~15 µs an item in Path.is_relative_to (15 s at 1M rows); resumes compare its value."""
    rows = [Row(line=i + 1, items={Modality.IMAGE: Path(p), Modality.TEXT: p}) for i, p in enumerate(_TRICKY)]
    rows.append(Row(line=99, items={Modality.TEXT: "a red circle", Modality.AUDIO: PurePath("/data/root/a.wav")}))
    for manifest in (Manifest(path=Path("m.jsonl"), root=Path(root), rows=rows),
                     Manifest(path=Path("m.jsonl"), root=root, rows=rows)):  # a str root, as a hand-built one may
        assert rows_fingerprint(manifest) == _old_rows_fingerprint(manifest)
    calls = _path_calls(monkeypatch)
    rows_fingerprint(Manifest(path=Path("m.jsonl"), root=Path(root), rows=rows))
    if root in ("/data/root", "/data/root/", "/", "/data"):  # an absolute root: Path only for the '//' item
        assert len(calls) <= 2


def test_rows_fingerprint_of_a_read_manifest(tmp_path, monkeypatch):
    """A read manifest (symlinked folder, '..', outside the root) was fingerprinted with Path methods per item."""
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    lines = [{"image": "img/a.png", "text": "a"}, {"image": "img/../img/./b.png", "audio": "../x.wav"},
             {"image": str(tmp_path / "elsewhere" / "c.png"), "label": "s"}, {"image": "img//d.png/"}]
    (tmp_path / "link" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for root in (tmp_path / "link", tmp_path / "link" / "img" / "..", str(tmp_path / "data") + "/"):
        manifest = read_manifest(tmp_path / "link" / "m.jsonl", root=root, allow_outside_root=True)
        expected = _old_rows_fingerprint(manifest)
        calls = _path_calls(monkeypatch)
        assert len(manifest) == 4 and rows_fingerprint(manifest) == expected and calls == []
        monkeypatch.undo()


def test_the_batch_size_named_fits_the_rows():
    """One row was told "set a smaller one (train.batch_size=2)" at a batch of 2."""
    from types import SimpleNamespace

    from mmembed.train.align_data import check_batch_fits

    for rows, said in ((1, r"fewer than train.batch_size=2: give more rows$"),
                       (7, r"fewer than train.batch_size=8: set a smaller one \(train.batch_size=4\), or give more")):
        with pytest.raises(UserError, match=said):
            check_batch_fits(SimpleNamespace(rows=[None] * rows, skipped=[]), rows + 1)
    check_batch_fits(SimpleNamespace(rows=[None] * 8, skipped=[]), 8)
