"""Time arithmetic for the engine, in the funnel's zone: durations, local waits, cron, quiet hours.

All inputs and outputs are timezone-aware datetimes; the zone only matters at the edges.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

_DURATION = re.compile(
    r"^P(?!$)(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?$"
)
MAX_DURATION = timedelta(days=3650)
WEEKDAYS = (1, 2, 3, 4, 5)
WEEKENDS = (6, 7)
EVERY_DAY = (1, 2, 3, 4, 5, 6, 7)


def parse_duration(text: str) -> timedelta:
    """ISO 8601 durations in weeks, days, hours, minutes and seconds (`P3D`, `PT15M`).

    Years and months are refused: their length depends on the calendar.
    """
    match = _DURATION.match(text)
    if not match:
        if re.match(r"^P(\d+Y|\d+M(?!.*T))", text):
            raise ValueError(
                f'"{text}": years and months have no fixed length; use weeks or days (P30D)'
            )
        raise ValueError(f'"{text}" is not an ISO 8601 duration such as P3D, PT15M or P1DT12H')
    parts = {k: int(v) for k, v in match.groupdict().items() if v}
    value = timedelta(**parts)
    if value > MAX_DURATION:
        raise ValueError(f'"{text}" is longer than ten years')
    return value


def parse_local_time(text: str) -> time:
    match = re.match(r"^([01]\d|2[0-3]):([0-5]\d)$", text)
    if not match:
        raise ValueError(f'"{text}" is not a 24-hour time such as 10:30')
    return time(int(match.group(1)), int(match.group(2)))


def days_of(spec: str | Sequence[int]) -> tuple[int, ...]:
    """ISO weekdays (Monday=1) for `every_day`, `weekdays`, `weekends` or an explicit list."""
    if spec == "every_day":
        return EVERY_DAY
    if spec == "weekdays":
        return WEEKDAYS
    if spec == "weekends":
        return WEEKENDS
    return tuple(sorted(set(spec)))  # type: ignore[arg-type]


def next_local_time(after: datetime, at: time, days: Sequence[int], zone: ZoneInfo) -> datetime:
    """The first moment after `after` whose local time in `zone` is `at` on one of `days`."""
    local = after.astimezone(zone)
    for offset in range(8):
        day: date = local.date() + timedelta(days=offset)
        if day.isoweekday() not in days:
            continue
        candidate = datetime.combine(day, at, tzinfo=zone)
        if candidate > local:
            return candidate.astimezone(after.tzinfo)
    raise ValueError("no allowed day")  # unreachable when days is non-empty


def cron_is_valid(expr: str) -> bool:
    return bool(croniter.is_valid(expr)) and len(expr.split()) == 5


def next_cron(after: datetime, expr: str, zone: ZoneInfo) -> datetime:
    """The next time the five-field cron expression fires after `after`, read in `zone`."""
    it = croniter(expr, after.astimezone(zone))
    nxt: datetime = it.get_next(datetime)
    return nxt.astimezone(after.tzinfo)


def cron_ever_fires(expr: str, start: datetime, zone: ZoneInfo) -> bool:
    try:
        next_cron(start, expr, zone)
    except (CroniterBadDateError, CroniterBadCronError):
        return False
    return True


def in_quiet_hours(moment: datetime, start: time, end: time, zone: ZoneInfo) -> bool:
    t = moment.astimezone(zone).time()
    if start == end:
        return False
    if start < end:
        return start <= t < end
    return t >= start or t < end  # wraps midnight (22:00–08:00)


def quiet_hours_end(moment: datetime, end: time, zone: ZoneInfo) -> datetime:
    """When quiet hours that contain `moment` are over."""
    local = moment.astimezone(zone)
    candidate = datetime.combine(local.date(), end, tzinfo=zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), end, tzinfo=zone)
    return candidate.astimezone(moment.tzinfo)


def local_date(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).date().isoformat()
