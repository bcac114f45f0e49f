"""A train setting that may be `auto` (train.compile, train.dequantized_base), resolved for one run: what it said,
what was decided, and why; recorded as such in reports/training.json."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    on: bool
    setting: str  # what the setting said: "true", "false" or "auto"
    reason: str

    @classmethod
    def pinned(cls, value: bool, key: str) -> Choice:
        """A setting the user pinned to true or false."""
        return cls(on=value, setting=str(value).lower(), reason=f"set by {key}")

    def record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}
