"""Sensitive-word and spam matching for group messages (护群).

Words go into one Aho–Corasick automaton (pyahocorasick, in C): a message is scanned once,
whatever the size of the list, so 10,000 words cost about what 10 do (`make bench` measures
it). Before matching, text and words are normalised the same way: NFKC (full-width letters
and digits become ASCII), case-folded, and with spaces and the separators people slip
between characters to dodge a filter removed ("微 信", "加-V") — so those still match.
Patterns (regular expressions) are for what a word cannot say; they run as one alternation.
"""

from __future__ import annotations

import re
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from threading import Lock
from typing import Any

import ahocorasick

_SEPARATORS = re.compile(r"[\s\-_.·•*|/\\~～、，,。!！?？'\"“”‘’()（）\[\]【】<>《》]+")
# A URL, or a bare domain with a common top-level domain ("加我 shop.vip").
LINK = re.compile(
    r"(?:https?://|www\.)[^\s]+|\b[a-z0-9][a-z0-9-]{0,62}\.(?:com|cn|net|org|top|xyz|cc|io|me|vip|shop|club|site|link|info)\b(?:/[^\s]*)?",
    re.IGNORECASE,
)


def normalise(text: str) -> str:
    return _SEPARATORS.sub("", unicodedata.normalize("NFKC", text).casefold())


@dataclass(frozen=True)
class Hit:
    rule: str  # word | pattern | link | qr_code | mini_program
    matched: str


class Matcher:
    """A group's sensitive words and patterns, compiled once."""

    def __init__(self, words: Iterable[str], patterns: Iterable[str] = ()) -> None:
        self._automaton: Any = None
        seen: set[str] = set()
        automaton = ahocorasick.Automaton()
        for word in words:
            key = normalise(word)
            if key and key not in seen:
                seen.add(key)
                automaton.add_word(key, word)
        if seen:
            automaton.make_automaton()
            self._automaton = automaton
        self.words = len(seen)
        compiled = [p for p in patterns if p]
        self._pattern = (
            re.compile("|".join(f"(?:{p})" for p in compiled), re.IGNORECASE) if compiled else None
        )

    def first(self, text: str) -> Hit | None:
        """The first sensitive word (as listed) or pattern match in `text`, or None."""
        if self._automaton is not None:
            for _end, word in self._automaton.iter(normalise(text)):
                return Hit("word", word)
        if self._pattern is not None:
            found = self._pattern.search(text)
            if found:
                return Hit("pattern", found.group(0)[:200])
        return None


def first_link(text: str, allowed_domains: Iterable[str] = ()) -> str | None:
    """The first link in `text` whose host is not one of `allowed_domains` (or a subdomain)."""
    allowed = tuple(d.lower().lstrip(".") for d in allowed_domains)
    for found in LINK.finditer(text):
        url = found.group(0)
        host = re.sub(r"^(?:https?://)?", "", url, flags=re.IGNORECASE).split("/", 1)[0].lower()
        host = host.split(":", 1)[0]
        if not any(host == d or host.endswith("." + d) for d in allowed):
            return url[:200]
    return None


def valid_pattern(pattern: str) -> str | None:
    """Why `pattern` is not a usable regular expression, or None."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"not a regular expression: {exc}"
    if compiled.match(""):
        return "matches empty text, so it would flag every message"
    return None


class MatcherCache:
    """Compiled matchers by (tenant, group, words version): a change of the list bumps the
    version, so every instance rebuilds on its next message; old versions age out."""

    def __init__(self, size: int = 256) -> None:
        self._items: OrderedDict[tuple[int, str, int], Matcher] = OrderedDict()
        self._size = size
        self._lock = Lock()

    def get(self, key: tuple[int, str, int], build: Any) -> Matcher:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        matcher: Matcher = build()
        with self._lock:
            self._items[key] = matcher
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return matcher


MATCHERS = MatcherCache()
