"""Chunk hashing and the Merkle root, checked against independent computations."""

from __future__ import annotations

import hashlib

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.content.hashing import ALGORITHMS, DIGEST_SIZE, hash_chunk, merkle_root, new_hasher
from peerd.errors import ManifestError


def H(algo: str, data: bytes) -> bytes:
    """Reference hash, computed without peerd."""
    if algo == "blake3":
        return blake3.blake3(data).digest()
    return hashlib.sha256(data).digest()


def reference_root(algo: str, leaves: list[bytes]) -> bytes:
    """A recursive restatement of the documented tree shape."""
    if not leaves:
        return H(algo, b"")
    level = [H(algo, b"\x00" + leaf) for leaf in leaves]
    while len(level) > 1:
        nxt = [H(algo, b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_hash_chunk_matches_reference_for_all_buffer_types(algo: str) -> None:
    data = bytes(range(256)) * 5000
    want = H(algo, data)
    assert hash_chunk(algo, data) == want
    assert hash_chunk(algo, bytearray(data)) == want
    assert hash_chunk(algo, memoryview(data)) == want
    assert len(want) == DIGEST_SIZE


def test_known_vectors() -> None:
    # Published test vectors for the empty input.
    assert (
        hash_chunk("sha256", b"").hex()
        == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert (
        hash_chunk("blake3", b"").hex()
        == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_new_hasher_is_incremental(algo: str) -> None:
    h = new_hasher(algo)
    h.update(b"abc")
    h.update(b"def")
    assert h.digest() == hash_chunk(algo, b"abcdef")


def test_unknown_algorithm() -> None:
    with pytest.raises(ManifestError, match="unknown hash algorithm"):
        hash_chunk("md5", b"x")
    with pytest.raises(ManifestError, match="unknown hash algorithm"):
        merkle_root("md5", b"")


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_merkle_small_shapes_explicitly(algo: str) -> None:
    a, b, c = (H(algo, bytes([i])) for i in range(3))
    la, lb, lc = (H(algo, b"\x00" + x) for x in (a, b, c))
    assert merkle_root(algo, b"") == H(algo, b"")
    assert merkle_root(algo, a) == la
    assert merkle_root(algo, a + b) == H(algo, b"\x01" + la + lb)
    # Three leaves: the odd third leaf is promoted unchanged to the top level.
    assert merkle_root(algo, a + b + c) == H(algo, b"\x01" + H(algo, b"\x01" + la + lb) + lc)


@settings(max_examples=60, deadline=None)
@given(
    algo=st.sampled_from(ALGORITHMS),
    leaves=st.lists(st.binary(min_size=32, max_size=32), max_size=40),
)
def test_merkle_matches_reference(algo: str, leaves: list[bytes]) -> None:
    assert merkle_root(algo, b"".join(leaves)) == reference_root(algo, leaves)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_merkle_is_order_and_content_sensitive(algo: str) -> None:
    a, b = H(algo, b"a"), H(algo, b"b")
    assert merkle_root(algo, a + b) != merkle_root(algo, b + a)
    # A single leaf whose hash equals an inner node must not collide with the pair.
    assert merkle_root(algo, a + b) != merkle_root(algo, merkle_root(algo, a + b))


def test_merkle_rejects_partial_digest() -> None:
    with pytest.raises(ManifestError, match="multiple of 32"):
        merkle_root("blake3", b"\x00" * 33)
