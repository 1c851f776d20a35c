"""The manifest readers pause Python's garbage collector (gc_pause.py) and leave it as they found it."""

import gc
import json

import pytest

from mmembed.data.instructions import read_instructions
from mmembed.data.manifest import read_manifest
from mmembed.errors import UserError
from mmembed.gc_pause import collector_paused


@pytest.mark.parametrize("enabled", [True, False])
def test_the_readers_leave_the_collector_as_they_found_it(tmp_path, enabled):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"text": "a red star"}) + "\n")
    instructions = tmp_path / "i.jsonl"
    instructions.write_text(json.dumps({"prompt": ["Say yes."], "answer": "yes"}) + "\n")
    (gc.enable if enabled else gc.disable)()
    try:
        seen = []
        with collector_paused():
            seen.append(gc.isenabled())
        assert len(read_manifest(manifest).rows) == 1 and gc.isenabled() is enabled
        assert len(read_instructions(instructions).rows) == 1 and gc.isenabled() is enabled
        with pytest.raises(UserError, match="not found"):
            read_manifest(tmp_path / "missing.jsonl")
        assert gc.isenabled() is enabled and seen == [False]
    finally:
        gc.enable()
