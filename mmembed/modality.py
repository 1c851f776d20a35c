"""The modalities mmembed knows. Shared code iterates over them; it never names one."""

from __future__ import annotations

from enum import StrEnum


class Modality(StrEnum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"

    @classmethod
    def parse(cls, value: str | Modality) -> Modality:
        """`Modality("imgae")` raises a bare ValueError; this one lists the valid names."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {value!r}; valid: {valid}") from None
