"""GPT-2 from a transformers folder: logits parity, tokenizer, extended vocabulary, bad folders."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmembed.decoder import PromptFormat, gpt2_tokenizer, load_gpt2  # noqa: E402
from mmembed.decoder.model import resize_token_embeddings  # noqa: E402
from mmembed.errors import CheckpointError, UserError  # noqa: E402
from tests.decoder.helpers import save_tiny_gpt2  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def test_logits_match_transformers_within_1e4(gpt2_folder):
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    ours = load_gpt2(gpt2_folder)
    ids = torch.randint(0, hf.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert ours.lm_head.weight is ours.token_embedding.weight  # tied, as GPT-2


def test_an_mlp_width_that_is_no_multiple_of_the_width_loads(tmp_path):
    """n_inner / n_embd × n_embd is 60.999… for 61 / 56 in floating point: the hidden width is rounded."""
    folder = save_tiny_gpt2(tmp_path, n_embd=56, n_inner=61)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ours = load_gpt2(folder)
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_a_checkpoint_saved_in_shards_loads(gpt2_folder, tmp_path):
    """transformers splits a large model (gpt2-xl) into shards named by model.safetensors.index.json."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (gpt2_folder / name).is_file():
            (folder / name).write_bytes((gpt2_folder / name).read_bytes())
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_gpt2(folder)(ids), hf(ids).logits, atol=1e-4, rtol=0)
    index = folder / "model.safetensors.index.json"
    spec = json.loads(index.read_text())
    first = next(iter(spec["weight_map"]))
    index.write_text(json.dumps({**spec, "weight_map": {name: 5 for name in spec["weight_map"]}}))
    with pytest.raises(CheckpointError, match="shard 5 is not a file name"):  # was a TypeError traceback
        load_gpt2(folder)
    index.write_text(json.dumps(spec))
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    torch.save(torch.zeros(2), folder / "odd.bin")  # a shard holding a bare tensor
    index.write_text(json.dumps({**spec, "weight_map": {**spec["weight_map"], first: "odd.bin"}}))
    with pytest.raises(CheckpointError, match="odd.bin: not a state dict of tensors"):
        load_gpt2(folder)
    index.write_text(json.dumps(spec))
    shard.unlink()
    with pytest.raises(CheckpointError, match="is not a file"):
        load_gpt2(folder)


def test_tokenizer_round_trips_and_keeps_special_text_plain(gpt2_folder):
    tok = gpt2_tokenizer(gpt2_folder)
    hf = transformers.AutoTokenizer.from_pretrained(gpt2_folder)
    text = "a small red circle, what do you hear? ünïcode <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == tok.bos_id == hf.eos_token_id and tok.eos_id not in tok.encode(text)
    assert tok.encode("a small red circle") == hf.encode("a small red circle", add_special_tokens=False)


def test_extra_marker_tokens_extend_the_vocabulary_without_changing_old_logits(gpt2_folder):
    ours = load_gpt2(gpt2_folder)
    vocab = ours.vocab_size
    fmt = PromptFormat(gpt2_tokenizer(gpt2_folder), soft_tokens=2)
    assert fmt.vocab_size > vocab and min(fmt.ids.values()) >= vocab  # every marker is a new id
    ids = torch.randint(0, vocab, (1, 12))
    with torch.no_grad():
        before = ours(ids)
        resize_token_embeddings(ours, fmt.vocab_size)
        after = ours(ids)
    torch.testing.assert_close(after[..., :vocab], before, atol=1e-6, rtol=0)
    assert ours.lm_head.weight is ours.token_embedding.weight


def test_bad_folders_are_clear_errors(gpt2_folder, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_gpt2(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="not gpt2"):
        load_gpt2(tmp_path)
    cfg = json.loads((gpt2_folder / "config.json").read_text())
    cfg["n_embd"] = 32  # weights no longer fit the config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((gpt2_folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="shape"):
        load_gpt2(tmp_path)



@pytest.mark.parametrize("change, match", [
    ({"n_layer": 1}, "hold block 1, but config.json says n_layer 1"),  # a block was dropped without a word
    ({"n_embd": "big"}, "n_embd must be a positive integer, got 'big'"),  # was a ValueError traceback
    ({"n_positions": None}, "n_positions must be a positive integer, got None"),  # was a TypeError
    ({"n_head": 5}, "is not a multiple of n_head 5"),
    ({"layer_norm_epsilon": -1.0}, r"layer_norm_epsilon must be in \(0, 1\), got -1.0"),  # loaded: NaN logits
    ({"n_positions": 10**15}, r"has shape \(128, 64\), config.json implies \(1000000000000000, 64\)"),  # was an
    # allocation of 256 PB before the weights were read (a smaller excess: gigabytes allocated and filled)
])
def test_a_config_json_that_does_not_describe_the_weights_is_a_checkpoint_error(gpt2_folder, tmp_path, change, match):
    cfg = json.loads((gpt2_folder / "config.json").read_text())
    assert cfg["n_layer"] == 2
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    (tmp_path / "model.safetensors").write_bytes((gpt2_folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=match):
        load_gpt2(tmp_path)


def test_tied_embeddings_with_a_different_head_in_the_file_are_refused(gpt2_folder, tmp_path):
    """One shared tensor took the file's lm_head.weight, overwriting its wte (transformers keeps wte)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(gpt2_folder / "model.safetensors"))
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
    (tmp_path / "config.json").write_text((gpt2_folder / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from its wte.weight"):
        load_gpt2(tmp_path)
    torch.save([1, 2], tmp_path / "pytorch_model.bin")  # a pickle of a list, not of tensors
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_gpt2(tmp_path)

@pytest.mark.parametrize("tie", ["false", 0])
def test_a_tie_word_embeddings_that_is_no_boolean_is_a_checkpoint_error(tmp_path, tie):
    """A string "false" tied an untied model, then blamed its lm_head for differing from its wte."""
    save_tiny_gpt2(tmp_path, tie_word_embeddings=False)
    untied = load_gpt2(tmp_path)
    assert untied.lm_head.weight is not untied.token_embedding.weight
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": tie}))
    with pytest.raises(CheckpointError, match=f"tie_word_embeddings must be true or false, got {tie!r}"):
        load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": None}))  # transformers: tied
    with pytest.raises(CheckpointError, match="lm_head.weight differs from its wte.weight"):
        load_gpt2(tmp_path)


def test_rows_past_the_tokenizer_in_a_padded_table_are_never_written(tmp_path):
    """A GPT-2 whose table is padded past its tokenizer (nanoGPT's 50,304 rows for 50,257 tokens)
    sampled those rows: ids no tokenizer decodes, counted against max_new_tokens and in the log-probs."""
    pytest.importorskip("transformers")
    from mmembed.config_decoder import DecoderConfig
    from mmembed.decoder import Sampling, Stops, build_prompt_model, generate, gpt2_tokenizer, resolve_prompts
    from mmembed.decoder.score import teacher_forced_logits
    from tests.decoder.helpers import DIM, fake_embed, save_tiny_gpt2

    save_tiny_gpt2(tmp_path, vocab_size=400)
    pm = build_prompt_model(DecoderConfig(init_from_gpt2=str(tmp_path), soft_tokens=2), gpt2_tokenizer(tmp_path), DIM)
    pm.lm.eval()
    assert pm.lm.decoder.vocab_size == 400 > pm.fmt.vocab_size
    cpu = torch.device("cpu")
    (r,) = resolve_prompts([["describe the picture", torch.ones(DIM)]], fake_embed, DIM, cpu)
    for seed in range(5):
        (out,) = generate(pm.lm, pm.fmt, [r], 30, Sampling(1.0), Stops(), seed, cpu)
        assert out.token_ids and max(out.token_ids) < pm.fmt.vocab_size
    logits = teacher_forced_logits(pm.lm, pm.fmt, r, [out.token_ids])
    assert torch.isinf(logits[..., pm.fmt.vocab_size:]).all()  # as generation: probability 0


def _tokenizer_folder(gpt2_folder, tmp_path, **changes):
    spec = json.loads((gpt2_folder / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, **changes}))
    return tmp_path


def test_a_truncation_or_padding_saved_in_tokenizer_json_is_not_applied(gpt2_folder, tmp_path):
    """transformers saves the truncation and padding its last call set: 'hello world…' was cut to
    4 ids and 'hi' padded to 12, without a word."""
    plain = gpt2_tokenizer(gpt2_folder)
    text = "hello world, a small red circle and a large blue square"
    assert len(plain.encode(text)) > 4
    truncation = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    padding = {"strategy": {"Fixed": 12}, "direction": "Right", "pad_to_multiple_of": None,
               "pad_id": plain.pad_id, "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    tok = gpt2_tokenizer(_tokenizer_folder(gpt2_folder, tmp_path, truncation=truncation, padding=padding))
    assert tok.encode(text) == plain.encode(text) and tok.encode("hi") == plain.encode("hi")
    saved = json.loads(tok.save(tmp_path / "saved.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None


def test_a_tokenizer_json_that_panics_the_library_is_a_checkpoint_error(gpt2_folder, tmp_path):
    """A malformed normalizer raised the library's PanicException (no Exception): a traceback."""
    bad = _tokenizer_folder(gpt2_folder, tmp_path, normalizer={"type": "Precompiled", "precompiled_charsmap": "AAAA"})
    with pytest.raises(CheckpointError, match="not a readable tokenizer.json .*precompiled_charsmap"):
        gpt2_tokenizer(bad)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("a b\n")
    with pytest.raises(CheckpointError, match="unreadable vocab.json"):
        gpt2_tokenizer(tmp_path)


def test_encode_takes_the_tokenizer_interfaces_options(gpt2_folder):
    """encode(text, **_) ignored them: encode("x", max_length=1, add_bos=True) gave [x's id]; a
    lone surrogate raised the library's bare TypeError."""
    from mmembed.errors import BadInput

    tok = gpt2_tokenizer(gpt2_folder)
    end = tok.eos_id
    text = "hello world, a small red circle"
    ids = tok.encode(text)
    assert tok.encode("x", max_length=1, add_bos=True) == [end]
    assert tok.encode(text, add_bos=True, add_eos=True) == [end, *ids, end]
    assert tok.encode(text, add_eos=True, max_length=4) == [*ids[:3], end]
    assert tok.encode(text + " " * 10_000 + "z" * 1_000_000, max_length=5) == ids[:5]
    assert tok.encode("a<|endoftext|>b", allowed_special="all") == [*tok.encode("a"), end, *tok.encode("b")]
    assert end not in tok.encode("a<|endoftext|>b")
    with pytest.raises(BadInput, match="lone surrogate U\\+D800 at index 2"):
        tok.encode("ab\ud800")
    with pytest.raises(TypeError, match="max_len"):
        tok.encode("x", max_len=3)
    with pytest.raises(UserError, match="allowed_special names unknown tokens"):
        tok.encode("x", allowed_special={"<bos>"})


def test_a_deeply_nested_config_json_is_a_checkpoint_error(tmp_path):
    """JSON arrays nested 5,000 deep raised RecursionError with a traceback."""
    (tmp_path / "config.json").write_text('{"model_type": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(CheckpointError, match="unreadable config"):
        load_gpt2(tmp_path)


def _spoilt_copy(gpt2_folder, tmp_path, key, spoil):
    from safetensors.torch import load_file, save_file

    state = load_file(str(gpt2_folder / "model.safetensors"))
    state[key] = spoil(state[key])
    (tmp_path / "config.json").write_text((gpt2_folder / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_a_wrong_shape_names_the_files_tensor_as_stored(gpt2_folder, tmp_path):
    """It named our transformer.blocks.1.mlp.fc.weight with the transposed shape (999, 64)."""
    key = "transformer.h.1.mlp.c_fc.weight"
    folder = _spoilt_copy(gpt2_folder, tmp_path, key, lambda t: torch.zeros(t.shape[0], 999))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight has shape \(64, 999\), "
                                              r"config.json implies \(64, 256\)"):
        load_gpt2(folder)


@pytest.mark.parametrize("spoil, match", [
    (lambda t: t.long(), "holds torch.int64 values"),  # load_state_dict cast them to float
    (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "holds NaN or infinite values"),
])
def test_integer_or_non_finite_gpt2_weights_are_refused(gpt2_folder, tmp_path, spoil, match):
    """Integer and non-finite tensors of the right shape loaded silently."""
    folder = _spoilt_copy(gpt2_folder, tmp_path, "transformer.h.0.attn.c_attn.weight", spoil)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.weight " + match):
        load_gpt2(folder)


def test_a_vocabulary_whose_ids_are_not_0_to_n_minus_1_is_refused(gpt2_folder, tmp_path):
    """Ids past the token count loaded: vocab_size counted tokens and markers took the ids from there,
    so a '%' moved to such an id typed <answer>; an <|endoftext|> at 10**8 loaded as eos."""
    spec = json.loads((gpt2_folder / "tokenizer.json").read_text())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    n = len(vocab) + 1  # and <|endoftext|>, an added token
    (tmp_path / "json").mkdir()
    moved = _tokenizer_folder(gpt2_folder, tmp_path / "json", model={**spec["model"], "vocab": {**vocab, "%": n}})
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: token '%' has the id"):
        gpt2_tokenizer(moved)
    (tmp_path / "merges.txt").write_text("\n".join(m if isinstance(m, str) else " ".join(m) for m in merges) + "\n")
    vocab_json = tmp_path / "vocab.json"
    vocab_json.write_text(json.dumps({**vocab, "<|endoftext|>": 10**8}))
    with pytest.raises(CheckpointError, match=r"vocab\.json: token '<\|endoftext\|>' has the id 100000000"):
        gpt2_tokenizer(tmp_path)
    vocab_json.write_text(json.dumps({**vocab, "<|endoftext|>": len(vocab)}))  # GPT-2's own layout loads
    tok, ref = gpt2_tokenizer(tmp_path), gpt2_tokenizer(gpt2_folder)
    assert (tok.vocab_size, tok.eos_id) == (ref.vocab_size, ref.eos_id) == (n, n - 1)
    assert PromptFormat(tok, 2).answer_id == n and tok.encode("what is 100%") == ref.encode("what is 100%")


def test_a_copied_or_pickled_tokenizer_keeps_special_text_plain(gpt2_folder):
    """deepcopy and pickle dropped `encode_special_tokens`: typed "<|endoftext|>" became the end id."""
    import copy
    import pickle

    tok = gpt2_tokenizer(gpt2_folder)
    text = "ignore this <|endoftext|> new doc"
    assert tok.eos_id not in tok.encode(text)
    for other in (copy.deepcopy(tok), pickle.loads(pickle.dumps(tok))):
        assert other.encode(text) == tok.encode(text)
        assert other.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


@pytest.mark.parametrize("ids, error, match", [
    ([5, 10_000], ValueError, "token id 10000 is outside the vocabulary"),  # was dropped without a word
    ([-1], ValueError, "token id -1 is outside"),  # was an OverflowError
    ([True], TypeError, "is a bool, not a token id"),  # was decoded as id 1
    (torch.zeros(2, 2, dtype=torch.long), TypeError, "1-D integer tensor"),
])
def test_decode_checks_the_ids_as_the_own_tokenizer_does(gpt2_folder, ids, error, match):
    """decode passed ids to the library unchecked: out-of-range ids vanished or raised its errors."""
    with pytest.raises(error, match=match):
        gpt2_tokenizer(gpt2_folder).decode(ids)


def test_missing_tensors_are_named_as_the_file_names_them(gpt2_folder, tmp_path):
    """A missing tensor was named by our internal name (transformer.blocks.1.mlp.fc.weight), and a
    config.json with more layers than the weights said "lack 12 tensors (first: transformer.blocks.2...)"."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(gpt2_folder / "model.safetensors"))
    (tmp_path / "config.json").write_text((gpt2_folder / "config.json").read_text())
    save_file({k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lack 1 tensor\(s\) of this config \(first: transformer\.h\.1\.mlp"
                                              r"\.c_fc\.weight\)"):
        load_gpt2(tmp_path)
    cfg = json.loads((gpt2_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json says n_layer 3, the weights hold blocks 0–1$"):
        load_gpt2(tmp_path)
