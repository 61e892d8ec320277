"""Member and console tokens: the fast reader of the tokens the service issues answers
exactly as PyJWT does, for tokens as issued, tampered with, or made otherwise."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from hypothesis import given
from hypothesis import strategies as st

from app import security
from app.security import AUDIENCE, CONSOLE_SESSION, _issue, _issued_claims, _read

NOW = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
SECRETS = st.text(st.characters(codec="utf-8"), min_size=32, max_size=64)


def _pyjwt(secret: str, audience: str, token: str, now: datetime) -> Any:
    """`_read` with PyJWT alone (the fast reader switched off)."""
    saved = security._issued_claims
    security._issued_claims = lambda *_: None  # type: ignore[assignment]
    try:
        return _read(secret, audience, token, now)
    finally:
        security._issued_claims = saved


@given(
    secret=SECRETS,
    audience=st.sampled_from([AUDIENCE, CONSOLE_SESSION]),
    tenant=st.integers(1, 2**53),
    subject=st.one_of(st.integers(1, 2**53).map(str), st.text(max_size=20)),
    ttl=st.integers(-3600, 10**7),
)
def test_an_issued_token_is_read_as_pyjwt_reads_it(
    secret: str, audience: str, tenant: int, subject: str, ttl: int
) -> None:
    token, _ = _issue(secret, audience, tenant, subject, NOW, ttl)
    assert _issued_claims(secret, audience, token) is not None  # the fast way is taken
    assert _read(secret, audience, token, NOW) == _pyjwt(secret, audience, token, NOW)
    other = CONSOLE_SESSION if audience == AUDIENCE else AUDIENCE
    assert _read(secret, other, token, NOW) is None  # a token of another kind
    assert _read(secret + "x", audience, token, NOW) is None  # another service's


@given(
    secret=SECRETS,
    at=st.integers(0, 400),
    char=st.characters(codec="ascii"),
    cut=st.booleans(),
)
def test_a_tampered_token_is_read_as_pyjwt_reads_it(
    secret: str, at: int, char: str, cut: bool
) -> None:
    token, _ = _issue(secret, AUDIENCE, 7, "42", NOW, 3600)
    at %= len(token)
    bad = token[:at] + ("" if cut else char) + token[at + 1 :]
    assert _read(secret, AUDIENCE, bad, NOW) == _pyjwt(secret, AUDIENCE, bad, NOW)
    if bad != token:
        assert _read(secret, AUDIENCE, bad, NOW) is None


PAYLOADS = st.fixed_dictionaries(
    {"sub": st.just("42"), "tid": st.just(7), "exp": st.just(int(NOW.timestamp()) + 60)},
    optional={
        "aud": st.one_of(st.just(AUDIENCE), st.just([AUDIENCE, "x"]), st.just("x")),
        "iat": st.integers(0, 2**31),
        "jti": st.one_of(st.text(max_size=5), st.integers()),
        "nbf": st.integers(0, 2**31),
    },
)


@given(
    secret=SECRETS,
    payload=PAYLOADS,
    headers=st.one_of(st.none(), st.just({"kid": "k1"}), st.just({"typ": "at+jwt"})),
)
def test_a_token_made_otherwise_is_left_to_pyjwt(
    secret: str, payload: dict[str, Any], headers: dict[str, Any] | None
) -> None:
    """Other claims, a list of audiences, another header: PyJWT decides."""
    token = jwt.encode(payload, secret, algorithm="HS256", headers=headers)
    ours = headers is None and payload.keys() == {"sub", "tid", "aud", "iat", "exp"}
    if not (ours and payload["aud"] == AUDIENCE):
        assert _issued_claims(secret, AUDIENCE, token) is None
    assert _read(secret, AUDIENCE, token, NOW) == _pyjwt(secret, AUDIENCE, token, NOW)


def test_an_expired_token_is_refused_both_ways() -> None:
    token, expires = _issue("s" * 40, AUDIENCE, 1, "2", NOW, 60)
    assert _read("s" * 40, AUDIENCE, token, expires - timedelta(seconds=1)) is not None
    assert _read("s" * 40, AUDIENCE, token, expires) is None


def _signed(secret: str, head: str, body: str) -> str:
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def test_a_payload_in_another_base64_spelling_is_read_as_pyjwt_reads_it() -> None:
    """Signed with the secret, but spelt otherwise than `_issue` spells it: with padding
    (PyJWT accepts it), or with the last character's unused bits set (PyJWT refuses)."""
    secret = "s" * 40
    spelt = 0
    for subject in ("1", "12", "123", "1234"):
        token, _ = _issue(secret, AUDIENCE, 1, subject, NOW, 60)
        head, body, _ = token.split(".")
        padded = body + "=" * (-len(body) % 4)
        variants = [padded] if padded != body else []
        if len(body) % 4:  # the last character carries unused bits: set one
            last = body[-1]
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            variants.append(body[:-1] + alphabet[alphabet.index(last) | 1])
        for other in variants:
            if other == body:
                continue
            spelt += 1
            forged = _signed(secret, head, other)
            assert _read(secret, AUDIENCE, forged, NOW) == _pyjwt(secret, AUDIENCE, forged, NOW)
    assert spelt >= 4
