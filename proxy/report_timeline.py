"""The report's timeline: requests counted over time, in buckets that fit the span.

Counted by the minute, so that an hour of log is a chart of minutes rather than one bar; folded
into hours when a log spans more minutes than are worth keeping (memory stays bounded however
long the log). Bucketing picks minutes, hours or days from the span; the HTML report draws it.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

_MINUTE, _HOUR = 16, 13  # key lengths: "2026-11-20T10:05", "2026-11-20T10"
_MINUTES_KEPT = 20_000  # about two weeks of minutes; longer logs are charted by hour or day
_BY_MINUTE_UNDER = timedelta(hours=6)
_BY_HOUR_UNDER = timedelta(days=14)
UNITS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}


class Timeline:
    """Requests per minute (or per hour, once there are too many minutes to keep)."""

    def __init__(self, minutes_kept: int = _MINUTES_KEPT) -> None:
        self.counts: Counter[str] = Counter()
        self.key_length = _MINUTE
        self.minutes_kept = minutes_kept

    def add(self, time: str) -> None:
        self.counts[time[:self.key_length]] += 1
        if self.key_length == _MINUTE and len(self.counts) > self.minutes_kept:
            self.key_length = _HOUR
            self.counts = _fold(self.counts, _HOUR)

    def hourly(self) -> dict[str, int]:
        """Hour -> requests ("2026-11-20T10"), as the JSON report has always given them."""
        return dict(sorted(_fold(self.counts, _HOUR).items()))

    def buckets(self) -> tuple[str, datetime, list[tuple[datetime, int]]]:
        """The unit that fits the span, the first bucket's start, and the non-empty buckets
        (start, requests). Keys that are not times (a log edited by hand) are left out."""
        moments: Counter[datetime] = Counter()
        for key, count in self.counts.items():
            try:
                moment = datetime.fromisoformat(key)
            except ValueError:
                continue
            moments[moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment] += count
        if not moments:
            return "minute", datetime.min.replace(tzinfo=UTC), []
        span = max(moments) - min(moments)
        if self.key_length == _MINUTE and span < _BY_MINUTE_UNDER:
            unit = "minute"
        else:
            unit = "hour" if span < _BY_HOUR_UNDER else "day"
        bucketed: Counter[datetime] = Counter()
        for moment, count in moments.items():
            bucketed[_floor(moment, unit)] += count
        return unit, min(bucketed), sorted(bucketed.items())


def _fold(counts: Counter[str], length: int) -> Counter[str]:
    folded: Counter[str] = Counter()
    for key, count in counts.items():
        folded[key[:length]] += count
    return folded


def _floor(moment: datetime, unit: str) -> datetime:
    moment = moment.astimezone(UTC).replace(second=0, microsecond=0)
    if unit in ("hour", "day"):
        moment = moment.replace(minute=0)
    if unit == "day":
        moment = moment.replace(hour=0)
    return moment
