"""The tree shape and digests both the image and the protocol depend on (pure logic)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diskrsync.base.merkle import (
    Shape,
    leaf_hash,
    root_from_leaves,
    root_hash,
    tree_root,
    zero_hash,
)

pytestmark = pytest.mark.pure

CS = 16384


@given(size=st.integers(0, CS * 5000), fanout=st.sampled_from([2, 3, 4, 128]))
def test_shape_covers_every_chunk_once_per_level(size, fanout):
    s = Shape(size, CS, fanout)
    assert s.chunks == -(-size // CS)
    assert sum(s.chunk_length(c) for c in range(s.chunks)) == size
    for level in range(1, s.top_level + 1):
        covered = [s.chunk_range(level, j) for j in range(s.count(level))]
        assert covered[0][0] == 0 and covered[-1][1] == s.chunks
        assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
        assert all(len(s.children(level, j)) <= fanout for j in range(s.count(level)))
    if size:
        assert s.count(s.top_level) == 1 and s.top_level >= 1
    else:
        assert s.level_counts == () and s.top_level == 0


@given(data=st.binary(max_size=CS * 20), fanout=st.sampled_from([2, 3, 128]))
def test_root_from_leaves_matches_the_reference(data, fanout):
    shape = Shape(len(data), CS, fanout)
    leaves = [leaf_hash(data[i : i + CS]) for i in range(0, len(data), CS)]
    assert root_from_leaves(shape, b"".join(leaves)) == tree_root(len(data), CS, fanout, leaves)


def test_roots_bind_size_and_content():
    a = bytes(CS)
    assert zero_hash(CS) == leaf_hash(a)
    # trailing zeros change the size, so they change the root
    r1 = tree_root(CS, CS, 128, [leaf_hash(a)])
    r2 = tree_root(CS + 1, CS, 128, [leaf_hash(a), leaf_hash(b"\0")])
    assert r1 != r2
    assert root_hash(0, CS, 128, b"") != root_hash(0, CS * 2, 128, b"")


def test_shape_rejects_impossible_geometry():
    with pytest.raises(ValueError):
        Shape(10, 1000, 128)
    with pytest.raises(ValueError):
        Shape(10, CS, 1)
