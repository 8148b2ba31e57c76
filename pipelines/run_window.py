"""Which data a run trains on: the day a scheduled run is for.

A recurring run must not be a cache hit on yesterday's data: the ``configure`` task receives KFP's
``{{$.pipeline_job_schedule_time_utc}}`` and sets ``data.until`` to the start of that day (UTC), so ingest
keeps what was known before it and every downstream task sees a new input. A run can name the day itself
(``data_until``, e.g. a backfill); a one-off run whose placeholder stays unresolved keeps params.yaml's
``data.until``, and so does run-local (``kfp.local`` cannot resolve the placeholder: it is not passed).
"""

from __future__ import annotations

from datetime import UTC, datetime


class RunWindowError(ValueError):
    """A run date that cannot be read; the message names the parameter."""


WINDOWS = ("day", "hour")  # the training pipeline runs daily, the index refresh hourly


def data_until(explicit: str, schedule_time: str, window: str = "day") -> datetime | None:
    """The start of the run's day, or hour (UTC): ``explicit`` if given, else the scheduled time, else
    None. The hourly index refresh sees the items created up to its hour, not only up to midnight."""
    if window not in WINDOWS:
        raise RunWindowError(f"window: {window!r} is not one of {WINDOWS}")
    for name, value in (("data_until", explicit), ("schedule time", schedule_time)):
        text = (value or "").strip()
        if not text or text.startswith("{{"):  # not given, or a placeholder nothing resolved
            continue
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise RunWindowError(f"{name}: {text!r} is not an ISO 8601 date or time") from None
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        start = moment.replace(minute=0, second=0, microsecond=0)
        return start if window == "hour" else start.replace(hour=0)
    return None
