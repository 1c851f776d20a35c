"""Exceptions that carry a user-facing message. The CLI prints them as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, bad config). Message is one line."""


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key and the file."""


class BadInput(UserError, ValueError):
    """One input item (file, waveform, caption) cannot be used; the message says why.

    Data loaders catch it, skip the row and count the reason; strict mode re-raises it.
    """


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, corrupted or not a safe format."""


class PeerLostError(UserError):
    """Distributed: another process of the run died, hung or stopped this one; the message says
    where the run can resume from. The CLI prints it as one line and exits 1."""


def refuse_run_folder(model: object, name: str = "model") -> None:
    """UserError when a run folder (a str or Path) is given where a loaded model goes: it failed later,
    on an attribute of a str ("'str' object has no attribute 'embed_dim'")."""
    import os

    if isinstance(model, (str, os.PathLike)):
        text = repr(str(model))
        raise UserError(f"{name} is the run folder {text if len(text) <= 40 else text[:40] + '…'}: "
                        f"pass {name}=mm.load(RUN), not the run folder")
