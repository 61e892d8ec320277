"""Random broken definitions always get a 422 with paths, never a 500 or a write."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.clock import FrozenClock
from app.db import make_engine
from app.migrations import upgrade
from tests.conftest import T0, Client, app_for, new_tenant
from tests.factories import office_lunch

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


BASE = office_lunch()
ALL_PATHS = [p for p in paths(BASE) if p]


@st.composite
def broken(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent = doc
        try:
            for part in path[:-1]:
                parent = parent[part]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(junk)
        except (KeyError, IndexError, TypeError):
            continue
    return doc


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    upgrade(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}")
    _, headers = new_tenant(engine)
    yield Client(app_for(engine, FrozenClock(T0))), headers
    engine.dispose()


@given(doc=broken())
def test_broken_definitions_are_422_with_paths_never_500(api, doc):
    client, headers = api
    r = client.put("/v1/funnels/office-lunch", json=doc, headers=headers)
    assert r.status_code in (200, 201, 422), r.text
    if r.status_code == 422:
        body = r.json()
        assert r.headers["content-type"] == "application/problem+json"
        assert body["errors"] and all(
            isinstance(e["path"], str) and e["message"] for e in body["errors"]
        )
