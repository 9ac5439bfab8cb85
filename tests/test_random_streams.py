"""The registry of random streams: no two streams of one family share an id."""

from __future__ import annotations

import pytest

from bmvae_tf import random_streams


@pytest.mark.parametrize("family", random_streams.FAMILIES, ids=lambda f: f.__name__)
def test_no_two_streams_of_a_family_share_an_id(family):
    # An IntEnum turns a repeated value into a silent alias, visible only in __members__.
    by_id: dict[int, list[str]] = {}
    for name, member in family.__members__.items():
        by_id.setdefault(int(member), []).append(name)
    shared = {i: names for i, names in by_id.items() if len(names) > 1}
    assert not shared, f"{family.__name__} streams share ids: {shared}"


def test_every_stream_family_is_listed():
    families = {v for v in vars(random_streams).values()
                if isinstance(v, type) and issubclass(v, random_streams.enum.IntEnum)
                and v is not random_streams.enum.IntEnum}
    assert families == set(random_streams.FAMILIES)
