"""The decoder: a causal language model that reads prompts interleaving text and media.

Reading order: model.py (the LM) → kv_cache.py → whitening.py → fusion.py (vectors → soft tokens at their
placeholders) → prompt.py (segments → ids) → sampling.py → answer.py (one answer and its stops) → decode.py
(the KV-cached loop) → generate.py → stream.py → score.py (scoring answers, best of N) → gpt2.py (pretrained
weights) → builder.py (config → modules, run files) → evaluate.py (answer and score instruction rows).
The training stage is `mmembed/train/decoder.py`.

    import mmembed as mm
    model = mm.load("runs/demo")
    out = model.generate(["What colour is", mm.Image("a.png"), "?"])
    dec = mm.decoder.load_gpt2("path/to/gpt2")      # a GPT-2 saved by transformers → Decoder
"""

from mmembed.decoder.builder import (DECODER_DIR, DECODER_TOKENIZER, DECODER_WEIGHTS, PromptModel,
                                     build_prompt_model, decoder_tokenizer, load_prompt_model, save_prompt_model,
                                     with_gpt2_architecture)
from mmembed.decoder.fusion import MultimodalLM, Projector, answer_logits
from mmembed.decoder.answer import Generation, Stops
from mmembed.decoder.decode import decode_steps
from mmembed.decoder.generate import generate
from mmembed.decoder.gpt2 import PretrainedTokenizer, gpt2_tokenizer, load_gpt2
from mmembed.decoder.kv_cache import KVCache, RollingKVCache
from mmembed.decoder.model import Decoder
from mmembed.decoder.prompt import (MEDIA, Audio, Embedded, Image, Media, Prompt, PromptFormat, Resolved, Slot, Text,
                                    is_batch, parse_inline, resolve_prompts)
from mmembed.decoder.sampling import Choice, Sampling, choose
from mmembed.decoder.score import Candidate, answer_logprobs, best_of, teacher_forced_logits
from mmembed.decoder.stream import StreamedToken, stream, stream_tokens

__all__ = [
    "DECODER_DIR", "DECODER_TOKENIZER", "DECODER_WEIGHTS", "MEDIA", "Audio", "Candidate", "Choice", "Decoder",
    "Embedded",
    "Generation",
    "Image", "KVCache", "Media", "MultimodalLM", "PretrainedTokenizer", "Projector", "Prompt", "PromptFormat",
    "PromptModel", "Resolved", "RollingKVCache", "Sampling", "Slot", "Stops", "StreamedToken", "Text", "answer_logits",
    "answer_logprobs", "best_of", "build_prompt_model",
    "choose", "decode_steps", "decoder_tokenizer", "generate", "gpt2_tokenizer", "is_batch", "load_gpt2",
    "load_prompt_model", "parse_inline", "resolve_prompts", "save_prompt_model", "stream", "stream_tokens",
    "teacher_forced_logits", "with_gpt2_architecture",
]
