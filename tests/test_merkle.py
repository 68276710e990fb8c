"""The tree shape and digests both the image and the protocol depend on (pure logic)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diskrsync.base.merkle import (
    PageFolder,
    Shape,
    leaf_hash,
    root_from_leaves,
    root_from_pages,
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


@given(pages=st.integers(1, 300), fanout=st.sampled_from([2, 3, 4, 64]),
       seed=st.integers(0, 2**32), spread=st.integers(0, 20))
def test_page_folder_gives_the_root_of_its_pages_in_any_order(pages, fanout, seed, spread):
    """Pages added in a shuffled order (each at most ``spread`` places from its own) fold
    into the root of the whole list; the folder holds a few groups per level when they come
    nearly in order (memory flat in the disk size, issue 16)."""
    rnd = random.Random(seed)
    shape = Shape(pages * fanout * CS - 5, CS, fanout)
    digests = [rnd.randbytes(32) for _ in range(shape.count(1))]
    order = sorted(range(len(digests)), key=lambda j: j + rnd.uniform(0, spread))
    folder = PageFolder(shape)
    most = 0
    for n, j in enumerate(order):
        assert not folder.known(j)
        folder.add(j, digests[j])
        assert folder.known(j)
        most = max(most, folder.held)
        if n + 1 < len(order):
            with pytest.raises(ValueError):
                folder.root()
    assert folder.root() == root_from_pages(shape, digests)
    assert folder.held == 0
    assert most <= shape.top_level * (spread + 2)
    with pytest.raises(AssertionError):
        folder.add(order[0], digests[order[0]])  # once only


def test_page_folder_of_one_page_and_of_none():
    one = Shape(CS, CS, 4)
    folder = PageFolder(one)
    folder.add(0, b"x" * 32)
    assert folder.root() == root_from_pages(one, [b"x" * 32])
    assert PageFolder(Shape(0, CS, 4)).root() == root_from_pages(Shape(0, CS, 4), [])
    with pytest.raises(IndexError):
        folder.add(1, b"y" * 32)
