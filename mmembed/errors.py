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
