"""Safe weight loading: a refused file says why in one line of ours; safetensors is known by its bytes."""

import os
import re

import pytest
import torch
from safetensors.torch import save_file

from encoders.weights import WeightsFileError, load_state_dict_file


class _Payload:
    """Unpickling this calls os.system: a file appears if the pickle runs code."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _refusal(path) -> str:
    with pytest.raises(WeightsFileError) as e:
        load_state_dict_file(path)
    message = str(e.value)
    assert "\n" not in message and "weights_only" not in message and "likely succeed" not in message
    return message


def test_a_pickle_needing_code_is_refused_naming_the_global_and_not_the_unsafe_fix(tmp_path):
    """Only torch's first line was kept: "Re-running torch.load with weights_only set to False will
    likely succeed", the advice that runs the payload, and not the global that was blocked."""
    torch.save({"w": torch.zeros(2), "x": _Payload(tmp_path / "pwned")}, tmp_path / "evil.pt")
    message = _refusal(tmp_path / "evil.pt")
    assert re.search(r"needs code to unpickle, not just plain tensors: it names \w+\.system;", message)
    assert not (tmp_path / "pwned").exists()


def test_an_html_page_saved_as_pt_is_named_so(tmp_path):
    """An error page saved under a weights name got the same "will likely succeed" advice."""
    (tmp_path / "model.pt").write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    assert "an HTML or XML page, not a weights file" in _refusal(tmp_path / "model.pt")


@pytest.mark.parametrize("name", ["model.pt", "model.bin", "model"])
def test_a_safetensors_file_loads_whatever_its_name(tmp_path, name):
    """A safetensors file named .pt or with no suffix went to torch.load and was "refused"."""
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    save_file(tensors, str(tmp_path / name))
    back = load_state_dict_file(tmp_path / name)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
