"""Stops (decoder/answer.py): what ends an answer besides <eos>."""

import pytest

from mmembed.cli import main
from mmembed.decoder import Stops
from tests.conftest import tiny_model
from tests.decoder.test_best_of import with_decoder


@pytest.mark.parametrize("stop, where", [("\udcff", "stop string 0: .* at position 0"),
                                         (["ok", 7, "a \udcff"], "stop string 1: .* at position 2")])
def test_a_stop_string_with_a_lone_surrogate_is_refused(stop, where):
    """It was accepted and could never match (the same byte in a prompt is refused)."""
    with pytest.raises(ValueError, match=f"^{where}"):
        Stops.parse(stop, 300)
    assert Stops.parse(["ok", 7, "a é"], 300).strings == ("ok", "a é")


def test_cli_stop_with_an_undecodable_byte_is_one_line(tmp_path, capsys):
    """`--stop $'\\xff'` ran with the stop silently ignored."""
    with_decoder(tiny_model(0)).save(tmp_path / "run")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "describe", "--stop", "\udcff"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmembed: error: stop string 0: text is not valid UTF-8 (an undecodable character at position 0)"
