"""The built-in synthetic world: scenes of coloured shapes, seen, heard and described.

Each scene holds one or two objects (shape, colour, size, position). The same attributes are
drawn into a PNG, synthesised into a WAV by fixed rules (colour -> pitch, shape -> timbre,
size -> loudness, position -> onset time) and written as captions, so every attribute can be
recovered from each modality alone and the modalities can only be aligned through meaning.

Reading order: `rules.py` (vocabularies and rules) -> `world.py` (sampling, held-out
combinations, splits) -> `render_image.py`, `render_audio.py`, `captions.py`, `questions.py`
-> `instructions.py` (decoder prompts, answers and scoring) -> `world_folder.py` (a world's folder:
complete, reused or refused) -> `generate.py` (files, manifests, world.json) -> `lookups.py` (the
lookup rows).

    from mmembed.data.synth import generate_world
    world = generate_world("data/shapes2000", n=2000, seed=0)
    world.manifests["train"]   # data/shapes2000/train.jsonl
    world.instructions["train"]   # data/shapes2000/instruct-train.jsonl
"""

from mmembed.data.synth.captions import SYNONYMS, canonical_caption, describe_scene, mentions, parse_caption
from mmembed.data.synth.generate import generate_world
from mmembed.data.synth.instructions import TASK_GROUPS, TASKS, instruction_rows, score, task_group
from mmembed.data.synth.lookups import write_lookup_rows
from mmembed.data.synth.rules import ATTRIBUTES, SYNTH_VERSION
from mmembed.data.synth.world import SPLITS, SceneObject, scene_label
from mmembed.data.synth.world_folder import WorldSummary

__all__ = [
    "ATTRIBUTES",
    "SPLITS",
    "SYNONYMS",
    "SYNTH_VERSION",
    "TASKS",
    "TASK_GROUPS",
    "SceneObject",
    "WorldSummary",
    "canonical_caption",
    "describe_scene",
    "generate_world",
    "instruction_rows",
    "mentions",
    "parse_caption",
    "scene_label",
    "score",
    "task_group",
    "write_lookup_rows",
]
