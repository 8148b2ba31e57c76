"""KFP's cron grammar (robfig/cron with a seconds field), checked before a schedule reaches the server."""

from __future__ import annotations

import re

_CRON_FIELDS = (  # KFP's cron (robfig/cron with seconds): name, lowest, highest, names for values
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)


_CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def kfp_cron(expression: str) -> str:
    """Check a cron expression in KFP's format (6 fields, seconds first) and return it normalised.

    KFP hands the expression to robfig/cron with a seconds field, so the 5-field crontab form most people
    type means something else there (or is rejected by the server long after the pipeline was uploaded).
    """
    text = " ".join(expression.split())
    if text in _CRON_DESCRIPTORS or re.fullmatch(r"@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", text):
        return text
    fields = text.split(" ") if text else []
    if len(fields) != len(_CRON_FIELDS):
        hint = f" (did you mean '0 {text}'?)" if len(fields) == 5 else ""
        raise ValueError(
            f"cron {expression!r} has {len(fields)} field(s); KFP's cron has 6, seconds first: "
            f"'second minute hour day-of-month month day-of-week', e.g. '0 0 3 * * *' for 03:00 daily{hint}"
        )
    for value, (name, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for item in value.split(","):
            _check_cron_item(item, name, low, high, names, wildcard_question=name.startswith("day of"))
    return text


def _check_cron_item(
    item: str, name: str, low: int, high: int, names: tuple[str, ...], wildcard_question: bool
) -> None:
    base, _, step = item.partition("/")
    if step and not (step.isdigit() and int(step) > 0):
        raise ValueError(f"cron {name} field {item!r}: the step after '/' must be a positive integer")
    if base == "*" or (base == "?" and wildcard_question):
        return
    bounds = base.split("-")
    if len(bounds) > 2 or not all(bounds):
        raise ValueError(f"cron {name} field {item!r}: expected '*', a value, or a range 'a-b'")
    numbers = [_cron_value(part, name, low, high, names) for part in bounds]
    if len(numbers) == 2 and numbers[0] > numbers[1]:
        raise ValueError(f"cron {name} field {item!r}: the range runs backwards")


def _cron_value(part: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    if part.upper() in names:
        return names.index(part.upper()) + low
    if not part.isdigit() or not low <= int(part) <= high:
        allowed = f"{low}-{high}" + (f" or {names[0]}-{names[-1]}" if names else "")
        raise ValueError(f"cron {name} value {part!r} is out of range (allowed {allowed})")
    return int(part)
