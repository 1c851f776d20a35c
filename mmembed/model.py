"""The object behind `mm.load(...)`: a shared space with its tokenizer and preprocessing, and
the decoder when the run trained one.

`Model.embed(modality, items)` takes raw items of any accepted kind (paths, PIL images,
waveforms, strings), preprocesses them exactly as training did (without augmentation), and
returns unit vectors. `Model.generate(prompt)` answers a prompt that mixes text and media.
A run directory is `model.safetensors` + `config.yaml` + `tokenizer.json` (+ `decoder.safetensors`);
opening one and checking its files fit each other is `model_load.py`.
"""

from __future__ import annotations

import hashlib
import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mmembed.checkpoint import save_tensors
from mmembed.config import Config, save_config
from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.preprocess import build_preprocessor
from mmembed.scalars import as_integer
from mmembed.space import SharedSpace, build_space, init_from_run

if TYPE_CHECKING:
    from mmembed.decoder import Generation, Prompt, PromptModel, Resolved, Stops, StreamedToken
    from mmembed.insight import AttentionMaps, SweepRow, TokenEntropy

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.yaml", "tokenizer.json"


class Model:
    """A trained (or freshly built) shared space, ready to embed raw inputs.

    Attributes:
        config: the full run config.
        space: the `SharedSpace` module (towers, heads, logit scale).
        tokenizer: the text tokenizer (None when the model has no text tower).
        embed_dim: D, the dimension of every embedding.
        prompt_model: the decoder stage (projector + language model), or None.
        query_tower: a text tower trained to place questions near the items they name, or None.
        query_threshold: the score a question must give an item to recall it (with the query tower).
        run_dir: the folder it was loaded from (absolute), or None for a model built in Python.
    """

    def __init__(self, config: Config, space: SharedSpace, tokenizer: Any | None,
                 prompt_model: PromptModel | None = None):
        self.config = config
        self.space = space
        self.tokenizer = tokenizer
        self.prompt_model = prompt_model
        self.query_tower: nn.Module | None = None  # questions → the items they ask about (`train/queries.py`)
        self.query_threshold: float | None = None  # the query tower's recall threshold, fitted with it
        self.embed_dim = space.embed_dim
        self.run_dir: Path | None = None  # a memory file records it: `mm.Memory(file)` can reopen the run
        self.preprocessors = {
            m: build_preprocessor(m, config.model.towers[str(m)].preprocess, tokenizer=tokenizer, train=False)
            for m in space.modalities
        }
        self._fingerprint: str | None = None

    @property
    def modalities(self) -> list[Modality]:
        return self.space.modalities

    @property
    def device(self) -> torch.device:
        return self.space.logit_bias.device

    def to(self, device: str | torch.device) -> Model:
        self.space.to(device)
        if self.prompt_model is not None:
            self.prompt_model.lm.to(device)
        if self.query_tower is not None:
            self.query_tower.to(device)
        return self

    @property
    def fingerprint(self) -> str:
        """Identity of the weights (sha256 over the state dict): indexes check it on load."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in sorted(self.space.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @torch.inference_mode()
    def embed(self, modality: Modality | str, items: Sequence[Any], batch_size: int = 64) -> Tensor:
        """Embed raw items of one modality.

        Args:
            modality: "text", "image" or "audio" (any modality with a tower).
            items: paths, PIL images, arrays/tensors, (waveform, sample_rate) pairs or strings.
            batch_size: items per forward pass.
        Returns:
            (N, D) float32 unit vectors on the CPU, in the order of `items`.
        Raises:
            BadInput naming the first item that cannot be read.
        """
        modality = Modality.parse(modality)
        return self._encode(modality, items, batch_size, lambda x, mask: self.space.encode(modality, x, mask))

    @torch.inference_mode()
    def embed_query(self, texts: str | Sequence[str], batch_size: int = 64, tower: nn.Module | None = None) -> Tensor:
        """Embed questions for finding the item they ask about: by the query tower when the run has
        one (`mmembed train-queries`), else by the text tower (then equal to `embed("text", ...)`).

        Args:
            texts: questions (or any text to search with).
            batch_size: texts per forward pass.
            tower: embed with this text-tower-shaped module instead (training compares with the text tower).
        Returns:
            (N, D) float32 unit vectors on the CPU, comparable with every modality's `embed`.
        """
        if Modality.TEXT not in self.preprocessors:
            raise UserError(f"this model has no text tower (it has: {', '.join(map(str, self.modalities))})")
        if tower is None:
            tower = self.query_tower if self.query_tower is not None else self.space.towers[str(Modality.TEXT)]
        was_training = tower.training
        tower.eval()
        try:
            return self._encode(Modality.TEXT, texts, batch_size, tower)
        finally:
            tower.train(was_training)

    def _encode(self, modality: Modality, items: Any, batch_size: int,
                encode: Callable[[Tensor, Tensor | None], Tensor]) -> Tensor:
        """Preprocess `items` in batches and run `encode(x, mask)` on each, in eval mode."""
        if modality not in self.preprocessors:
            have = ", ".join(map(str, self.modalities))
            raise UserError(f"this model has no {modality} tower (it has: {have})")
        if (n := as_integer(batch_size)) is None or n < 1:  # numpy's ints and 0-d tensors too
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        batch_size = n
        if _one_item(items):
            items = [items]
        pre = self.preprocessors[modality]
        was_training = self.space.training
        self.space.eval()
        out = []
        try:
            for start in range(0, len(items), batch_size):
                samples = []
                for i, item in enumerate(items[start:start + batch_size], start):
                    try:
                        samples.append(pre(item))
                    except BadInput as e:
                        raise BadInput(f"{modality} item {i}: {e}") from None
                x, mask = pre.collate(samples)
                x = x.to(self.device)
                mask = mask.to(self.device) if mask is not None else None
                out.append(encode(x, mask).float().cpu())
        finally:
            self.space.train(was_training)
        if not out:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(out)  # (N, D)

    def generate(self, prompt: Prompt | list[Prompt], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop: str | int | Sequence | None = None,
                 seed: int | None = None, best_of: int = 1,
                 rerank_weight: float = 1.0) -> Generation | list[Generation]:
        """Answer a prompt that interleaves text and media.

        Args:
            prompt: a `str`, or a list of segments — `str`, `mm.Image(...)`, `mm.Audio(...)`,
                `mm.Text(...)`, or a (D,) shared-space tensor — in any order (one segment may
                come alone). A list of such lists is a batch (left-padded, one forward pass per
                step).
            max_new_tokens: most tokens to write (fewer when the context ends first; a decoder
                with a sliding window and rotary or sinusoidal positions writes on past it).
            temperature: 0 = greedy; higher = more random.
            top_k, top_p: keep the k most likely tokens / the smallest set reaching probability p.
            stop: stop strings (cut from the text) and/or token ids; <eos> always stops.
            seed: seeds the sampling for a reproducible draw.
            best_of: answer with the best of this many candidates: the greedy answer and
                best_of − 1 sampled at `temperature` (which must then be > 0), ranked by mean
                log-probability per token plus `rerank_weight` × the space's logit scale × the mean
                cosine between the answer's text vector and the prompt's media (`decoder/score.py`).
                The shared space knows combinations the decoder never wrote in training; it
                judges descriptions of pictures and sounds, not short answers to questions
                (those it makes worse; README, "Python API").
            rerank_weight: 0 ranks by log-probability alone; needs a text tower when > 0.

        Returns:
            A `Generation` (text, token_ids, logprobs, entropy in nats per token; with best_of > 1
            also `candidates`, best first), or a list of them for a batch.

        Raises:
            UserError: the run has no decoder. BadInput naming the segment: an empty prompt,
            unreadable media, a vector of the wrong shape/dtype/device or with NaN; a prompt
            longer than the context of a decoder that does not slide past it (no window, or learned
            positions). ValueError: invalid sampling arguments.
        """
        from mmembed.decoder import generate as run_batch
        from mmembed.decoder.generate import check_prompts_fit, seeded
        from mmembed.decoder.score import check_best_of
        from mmembed.decoder.score import best_of as best_of_n

        pm, prompts, batch, args = self._generation_inputs(prompt, temperature, top_k, top_p, stop)
        check_best_of(best_of, rerank_weight, args[0])
        if len(prompts) > 64:  # before the first chunk of 64 runs, naming a prompt by its place in the whole list
            check_prompts_fit(pm.lm, pm.fmt, prompts)
        if best_of > 1:
            scale = float(self.space.logit_scale.detach())
            outs = best_of_n(pm.lm, pm.fmt, prompts, best_of, max_new_tokens, *args, seed, self.device,
                             self._answer_embedder(rerank_weight), scale, rerank_weight)
            return outs if batch else outs[0]
        outs, generator = [], seeded(seed, self.device)  # one stream of draws over the chunks
        for start in range(0, len(prompts), 64):
            outs += run_batch(pm.lm, pm.fmt, prompts[start:start + 64], max_new_tokens, *args, generator, self.device)
        return outs if batch else outs[0]

    def _answer_embedder(self, rerank_weight: float) -> Callable[[list[str]], Tensor] | None:
        """What `best_of` judges answers with: the text tower (answers are text)."""
        if rerank_weight == 0:
            return None
        if Modality.TEXT not in self.modalities:
            raise UserError("rerank_weight > 0 ranks answers by the text tower, which this model lacks: "
                            "pass rerank_weight=0 to rank them by log-probability alone")
        return lambda texts: self.embed(Modality.TEXT, texts)

    def stream(self, prompt: Prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, stop: str | int | Sequence | None = None,
               seed: int | None = None) -> Iterator[str]:
        """Yield the answer to one prompt in text pieces as they are decoded (arguments as in
        `generate`); the pieces join to the `text` that `generate` returns for the same seed."""
        from mmembed.decoder import stream

        pm, prompts, batch, args = self._generation_inputs(prompt, temperature, top_k, top_p, stop)
        if batch:
            raise UserError("stream takes one prompt; use generate for a batch")
        yield from stream(pm.lm, pm.fmt, prompts[0], max_new_tokens, *args, seed, self.device)

    def stream_tokens(self, prompt: Prompt, max_new_tokens: int = 32, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, stop: str | int | Sequence | None = None,
                      seed: int | None = None) -> Iterator[StreamedToken]:
        """`stream`, one `StreamedToken` per generated token: its id, the text it releases, its
        log-probability and the entropy of the distribution it was drawn from (what a page colours
        token by token). The ids, log-probs and entropies are `generate`'s for the same seed."""
        from mmembed.decoder import stream_tokens

        pm, prompts, batch, args = self._generation_inputs(prompt, temperature, top_k, top_p, stop)
        if batch:
            raise UserError("stream_tokens takes one prompt; use generate for a batch")
        yield from stream_tokens(pm.lm, pm.fmt, prompts[0], max_new_tokens, *args, seed, self.device)

    def attention_maps(self, prompt: Prompt) -> AttentionMaps:
        """The decoder's attention over one prompt (given as to `generate`), per layer and head.

        One prefill forward with temporary hooks: generation itself is untouched.

        Returns:
            `AttentionMaps`: weights (layers, heads, T, T) and a label per position (media soft
            tokens as `<image 1>`, `<audio 1>` ...); `.plot(png)` draws them.

        Raises:
            UserError: the run has no decoder, or a batch was given. BadInput as in `generate`.
        """
        from mmembed.insight import attention_maps

        pm, resolved, _ = self._one_prompt(prompt, "attention_maps")
        return attention_maps(pm, resolved, self.device)

    def temperature_sweep(self, prompt: Prompt, temperatures: Sequence[float], samples: int = 8,
                          max_new_tokens: int = 32, seed: int | None = 0, top_k: int | None = None,
                          top_p: float | None = None, stop: str | int | Sequence | None = None) -> list[SweepRow]:
        """Sample `samples` answers to one prompt at each temperature (other arguments as in
        `generate`; the same seed at every temperature).

        Returns:
            One `SweepRow` per temperature: mean entropy of the distribution drawn from and of the
            model's own (T = 1), distinct-1/2 over the answers (see `mmembed.insight.entropy`).
        """
        from mmembed.insight import temperature_sweep

        pm, resolved, stops = self._one_prompt(prompt, "temperature_sweep", top_k, top_p, stop)
        return temperature_sweep(pm, resolved, temperatures, self.device, samples, max_new_tokens, seed, top_k,
                                 top_p, stops)

    def token_entropy(self, prompt: Prompt, generation: Generation) -> TokenEntropy:
        """Per-token entropies of a `generation` of `prompt`: of the distribution each token was
        drawn from (`generation.entropy`) and of the model's own (T = 1); `.plot(png)` draws them."""
        from mmembed.insight import token_entropy

        pm, resolved, _ = self._one_prompt(prompt, "token_entropy")
        return token_entropy(pm, resolved, generation)

    def _one_prompt(self, prompt: Any, what: str, top_k: int | None = None, top_p: float | None = None,
                    stop: Any = None) -> tuple[PromptModel, Resolved, Stops]:
        pm, prompts, batch, (_, stops) = self._generation_inputs(prompt, 0.0, top_k, top_p, stop)
        if batch:
            raise UserError(f"{what} takes one prompt, not a batch")
        return pm, prompts[0], stops

    def _generation_inputs(self, prompt: Any, temperature: float, top_k: int | None, top_p: float | None,
                           stop: Any) -> tuple[PromptModel, list, bool, tuple]:
        from mmembed.decoder import Sampling, Stops, is_batch, resolve_prompts
        from mmembed.model_load import no_decoder

        if self.prompt_model is None:
            raise UserError(no_decoder(self, "generate"))
        sampling, stops = Sampling(temperature, top_k, top_p), Stops.parse(stop, self.prompt_model.fmt.vocab_size)
        batch = is_batch(prompt)
        prompts = resolve_prompts(list(prompt) if batch else [prompt], self.embed, self.embed_dim, self.device)
        return self.prompt_model, prompts, batch, (sampling, stops)

    def save(self, run_dir: str | Path, *, started_in: Path | None = None) -> Path:
        """Write weights, config and tokenizer (and the decoder's and query tower's) into `run_dir`, each
        file atomically; `started_in`: a training run's working directory, recorded in its config.yaml
        (`config.save_config`)."""
        from mmembed.decoder import save_prompt_model
        from mmembed.train.queries import save_query_tower

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_tensors(run_dir / WEIGHTS, self.space.state_dict())
        save_config(self.config, run_dir / CONFIG, started_in)
        if self.tokenizer is not None:
            self.tokenizer.save(run_dir / TOKENIZER)
        if self.prompt_model is not None:
            save_prompt_model(self.prompt_model, run_dir, self.fingerprint)
        if self.query_tower is not None:
            save_query_tower(self, run_dir)
        return run_dir

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None) -> Model:
        """Open a run directory (or a checkpoint folder inside one), with its decoder if it has one.

        Args:
            run_dir: the run's folder (model.safetensors, config.yaml, tokenizer.json).
            device: "auto" (the GPU when there is one, else the CPU), "cpu", "cuda", "cuda:N" or
                "mps"; None: the CPU.
        Raises:
            CheckpointError: config.yaml does not fit the weights (a preprocess size its encoder refuses).
        """
        from mmembed.model_load import _load_decoder, check_decoder_space, load_space
        from mmembed.train.distributed import resolve_device
        from mmembed.train.queries import load_query_tower

        # before anything loads: "auto" as train.device reads it; 'meta' loaded, then failed at the first embed
        device = None if device is None else resolve_device(device)
        with torch.random.fork_rng(devices=[]):  # modules are built (drawing weights) before the saved ones load:
            model = load_space(run_dir)          # a caller's random stream must not depend on a load
            run_dir = Path(run_dir)
            model.prompt_model = _load_decoder(run_dir, model.config, model.tokenizer, model.embed_dim)
            if model.prompt_model is not None:
                check_decoder_space(run_dir, model)
            model.query_tower, model.query_threshold = load_query_tower(run_dir, model)
        return model.to(device) if device is not None else model


def build_model(config: Config, tokenizer: Any | None, restoring: bool = False) -> Model:
    """A freshly initialised model for `config` (weights of `model.init_from` loaded if set).

    Args:
        restoring: every weight is about to be overwritten (a checkpoint's, on a resume): the
            `model.init_from` run is not read, so a resume does not need it where it started.
    """
    space = build_space(config.model, getattr(tokenizer, "vocab_size", None), config.loss.kind)
    if config.model.init_from and not restoring:
        frozen = frozenset(name for name, tower in config.model.towers.items() if tower.freeze)
        # a frozen tower with weights of its own (an encoder's `pretrained` file or tag) may take none from the run
        own = frozenset(name for name in frozen if config.model.towers[name].encoder_args.get("pretrained"))
        init_from_run(space, Path(config.model.init_from) / WEIGHTS, config.model.init_towers, frozen, own)
    return Model(config, space, tokenizer)


def load(run_dir: str | Path, device: str | torch.device | None = None) -> Model:
    """`mm.load("runs/demo")`: open a trained run. See `Model.load`."""
    return Model.load(run_dir, device)


def _one_item(items: Any) -> bool:
    """Whether `items` is one item rather than a sequence of them: a path, a string, raw bytes,
    a (data, sample_rate) pair, or anything that is not a sequence (a PIL image, an array)."""
    if isinstance(items, (str, Path, bytes, bytearray, memoryview)) or not isinstance(items, Sequence):
        return True
    return (isinstance(items, tuple) and len(items) == 2 and _a_rate(items[1])
            and not isinstance(items[0], (str, Path)))


def _a_rate(x: Any) -> bool:
    """A number, or a 0-d array or tensor (`np.load(...)["sr"]`, `torch.tensor(16000)`): a pair's
    sample rate (a 0-d one made the pair two items, the rate refused as a clip of dtype int64)."""
    if isinstance(x, (np.ndarray, Tensor)):
        return x.ndim == 0
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
