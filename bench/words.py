"""Sensitive-word matching: a 10,000-word list against Chinese group messages, per message,
next to the loop over words it replaces (measured in the same run)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from app.mechanics.community.matcher import Matcher, normalise

WORDS = 10_000
MESSAGES = 2_000
_HANZI = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def corpus(seed: int = 7) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)  # noqa: S311 - a reproducible corpus, not a secret
    words = sorted({"".join(rng.choices(_HANZI, k=rng.randint(2, 4))) for _ in range(WORDS * 2)})
    words = words[:WORDS]
    messages = []
    for i in range(MESSAGES):
        text = "".join(rng.choices(_HANZI + list("，。！？ 0123456789abc"), k=rng.randint(10, 120)))
        if i % 10 == 0:  # one message in ten carries a listed word
            at = rng.randint(0, len(text))
            text = text[:at] + rng.choice(words) + text[at:]
        messages.append(text)
    return words, messages


def _per_message_us(check: Callable[[str], Any], messages: list[str], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for text in messages:
            check(text)
    return (time.perf_counter() - start) / (rounds * len(messages)) * 1e6


def measure() -> dict[str, Any]:
    words, messages = corpus()
    built = time.perf_counter()
    matcher = Matcher(words)
    build_ms = (time.perf_counter() - built) * 1000
    keys = [normalise(w) for w in words]

    def naive(text: str) -> Any:
        t = normalise(text)
        return next((w for w in keys if w in t), None)

    hits = sum(1 for m in messages if matcher.first(m))
    assert hits == sum(1 for m in messages if naive(m)), "the automaton and the loop disagree"
    automaton_us = _per_message_us(matcher.first, messages, rounds=5)
    loop_us = _per_message_us(naive, messages[:200], rounds=1)
    return {
        "words": len(words),
        "messages": len(messages),
        "hits": hits,
        "build_ms": round(build_ms, 1),
        "automaton_us": round(automaton_us, 2),
        "loop_us": round(loop_us, 1),
    }


if __name__ == "__main__":
    print(measure())
