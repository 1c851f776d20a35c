"""Path items: empty paths and paths whose ends a message would hide."""

from __future__ import annotations

import pytest

from mmembed.errors import BadInput
from mmembed.preprocess.audio import AudioPreprocessor
from mmembed.preprocess.image_decode import load_image

LOADERS = {"image": load_image, "audio": AudioPreprocessor().waveform}


@pytest.mark.parametrize("modality", LOADERS)
@pytest.mark.parametrize("path", ["", "  ", "\n"])
def test_an_empty_path_is_refused_as_such(modality, path):
    """Path("") is ".": an empty path was refused as "not a file: .", naming no item."""
    with pytest.raises(BadInput) as caught:
        LOADERS[modality](path)
    assert str(caught.value) == f"empty path {path!a}: give the file's path"


@pytest.mark.parametrize("modality", LOADERS)
@pytest.mark.parametrize("tail", ["\n", " ", "\t", "\r\n"])
def test_a_missing_path_ending_in_whitespace_is_shown_quoted(tmp_path, modality, tail):
    """"missing file /x/s005700.png\\n" printed the newline raw: the line read as naming a file that exists."""
    path = str(tmp_path / "s005700.png") + tail
    with pytest.raises(BadInput) as caught:
        LOADERS[modality](path)
    assert str(caught.value) == f"missing file {path!a}"


@pytest.mark.parametrize("modality", LOADERS)
def test_a_folder_named_with_a_trailing_space_is_shown_quoted(tmp_path, modality):
    folder = tmp_path / "clips "
    folder.mkdir()
    with pytest.raises(BadInput) as caught:
        LOADERS[modality](str(folder))
    assert str(caught.value) == f"not a file: {str(folder)!a}"


@pytest.mark.parametrize("modality", LOADERS)
def test_a_plain_missing_path_is_shown_as_typed(tmp_path, modality):
    path = str(tmp_path / "my clip.png")  # an inner space is visible: no quotes
    with pytest.raises(BadInput) as caught:
        LOADERS[modality](path)
    assert str(caught.value) == f"missing file {path}"
