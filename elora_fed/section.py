"""A config section's base class and the checks its ``validate`` uses, each naming the bad key."""

from __future__ import annotations

from typing import Any, TypeVar

from elora_fed.errors import ConfigError


class Section:
    """A config section: validated when built, directly (``DataConfig(seq_len=0)`` raises) or from keys.

    Checks that span sections stay in ``RunConfig.validate``.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError


def coerce(key: str, value: Any, expected: type) -> Any:
    """Accept ``value`` for a field of type ``expected``; ints widen to floats, nothing else."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"config key '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


Number = TypeVar("Number", int, float)


def check_range(
    key: str,
    value: Number,
    low: Number | None = None,
    high: Number | None = None,
    inclusive_low: bool = True,
    inclusive_high: bool = True,
) -> None:
    too_low = low is not None and (value < low if inclusive_low else value <= low)
    too_high = high is not None and (value > high if inclusive_high else value >= high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>=' if inclusive_low else '>'} {low}"
        hi = "" if high is None else f"{'<=' if inclusive_high else '<'} {high}"
        raise ConfigError(
            f"config key '{key}' = {value!r} is out of range: must be {' and '.join(filter(None, [lo, hi]))}"
        )


def check_dotted_path(key: str, value: str) -> None:
    module, sep, name = value.rpartition(":")
    if not sep or not module or not name.isidentifier():
        raise ConfigError(
            f"config key '{key}' = {value!r} is not of the form 'package.module:Class' or 'path/file.py:Class'"
        )


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{key}' = {value!r} is not one of {', '.join(choices)}")
