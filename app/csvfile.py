"""CSV downloads: UTF-8 with a byte-order mark, so spreadsheet programs read Chinese, and
CRLF line ends (RFC 4180). Every export (reports, members, the kitchen summary) uses this."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

BOM = "\ufeff"


def line(values: Iterable[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> bytes:
    return (BOM + line(header) + "".join(line(r) for r in rows)).encode()
