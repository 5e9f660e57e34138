"""Manifests: building from real files, canonical encoding, verification, hostile input."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from peerd.content.hashing import ALGORITHMS, hash_chunk, merkle_root
from peerd.content.identity import Identity
from peerd.content.manifest import (
    MAX_SIGNATURES,
    Info,
    Manifest,
    build_manifest,
    content_id_hex,
    default_chunk_size,
    parse_content_id,
    verify_chunk,
)
from peerd.errors import (
    ChunkHashMismatch,
    ContentIdMismatch,
    IntegrityError,
    ManifestError,
    SignatureError,
    StorageError,
    UntrustedManifest,
)

KiB = 1024
MiB = 1024 * KiB
CS = 16 * KiB  # the smallest chunk size keeps the tests fast

ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)


def make_info(name: str = "f.bin", data: bytes = b"hello", algo: str = "blake3") -> Info:
    hashes = b"".join(hash_chunk(algo, data[i : i + CS]) for i in range(0, len(data), CS))
    return Info(name, len(data), CS, algo, hashes, merkle_root(algo, hashes))


@pytest.fixture(scope="module")
def signed() -> Manifest:
    return Manifest(make_info(data=os.urandom(3 * CS + 5))).signed(ALICE)


# --- building from real files ---------------------------------------------------
@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 4 * CS, 4 * CS + 123])
@pytest.mark.parametrize("threads", [1, 3])
def test_build_manifest_sizes(tmp_path: Path, algo: str, size: int, threads: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "some file.bin"
    path.write_bytes(data)
    info = build_manifest(path, algo=algo, chunk_size=CS, threads=threads)
    n = -(-size // CS)
    assert (info.name, info.size, info.chunk_size, info.algo, info.num_chunks) == (
        "some file.bin",
        size,
        CS,
        algo,
        n,
    )
    # Each chunk hash is computed independently here, straight from the bytes.
    for i in range(n):
        chunk = data[i * CS : (i + 1) * CS]
        assert info.chunk_length(i) == len(chunk)
        assert info.chunk_hash(i) == hash_chunk(algo, chunk)
        verify_chunk(info, i, chunk)
        verify_chunk(info, i, memoryview(bytearray(chunk)))
    assert info.root == merkle_root(algo, info.hashes)
    assert Info.decode(info.encode()) == info
    with pytest.raises(ManifestError, match="out of range"):
        info.chunk_length(n)


def test_build_manifest_default_chunk_size(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(os.urandom(MiB + 7))
    info = build_manifest(path)
    assert (info.chunk_size, info.num_chunks, info.algo) == (MiB, 2, "blake3")
    assert info.chunk_length(1) == 7


def test_default_chunk_size_rule() -> None:
    assert default_chunk_size(0) == MiB
    assert default_chunk_size(32 * 1024 * MiB) == MiB  # 32768 chunks fits exactly
    assert default_chunk_size(32 * 1024 * MiB + 1) == 2 * MiB
    assert default_chunk_size(2**50) == 64 * MiB


def test_build_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open"):
        build_manifest(tmp_path / "missing")
    with pytest.raises(StorageError, match="not a regular file"):
        build_manifest(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(StorageError, match="not a regular file"):
        build_manifest(tmp_path / "fifo")  # must not block waiting for a writer
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ManifestError, match="power of two"):
        build_manifest(tmp_path / "f", chunk_size=3 * CS)
    with pytest.raises(ManifestError, match="unknown hash algorithm"):
        build_manifest(tmp_path / "f", algo="md5")
    bad = tmp_path / "bad\x01name"
    bad.write_bytes(b"x")
    with pytest.raises(ManifestError, match="control character"):
        build_manifest(bad)


# --- encoding -------------------------------------------------------------------------
def test_info_encoding_is_the_documented_map() -> None:
    info = make_info(data=b"x" * (CS + 1))
    decoded = msgpack.unpackb(info.encode(), raw=False)
    assert list(decoded) == ["v", "name", "size", "chunk_size", "algo", "hashes", "root"]
    assert decoded["v"] == 1 and decoded["hashes"] == info.hashes
    assert info.content_id == hashlib.sha256(info.encode()).digest()


def test_manifest_round_trip(signed: Manifest) -> None:
    again = Manifest.decode(signed.encode())
    assert again == signed
    assert again.content_id == signed.content_id
    again.verify(signed.content_id, trust=ALICE.public_key)
    body = msgpack.unpackb(signed.encode(), raw=False)
    assert list(body) == ["info", "sigs"] and body["info"] == signed.info.encode()


def test_non_canonical_info_encodings_are_rejected() -> None:
    info = make_info()
    body = msgpack.unpackb(info.encode(), raw=False)
    reordered = dict(reversed(list(body.items())))
    with pytest.raises(ManifestError, match="keys"):
        Info.decode(msgpack.packb(reordered, use_bin_type=True))
    # Same values, but size written as a uint64 instead of the shortest form.
    canonical = info.encode()
    wide = canonical.replace(b"\xa4size\x05", b"\xa4size\xcf" + (5).to_bytes(8, "big"))
    assert wide != canonical and msgpack.unpackb(wide, raw=False) == body
    with pytest.raises(ManifestError, match="canonical"):
        Info.decode(wide)
    # Name sent as bin instead of str, bool instead of int, extra key, trailing bytes.
    for mutate in (
        lambda b: b.update(name=b"f.bin"),
        lambda b: b.update(v=True),
        lambda b: b.update(extra=1),
    ):
        changed = dict(body)
        mutate(changed)
        with pytest.raises(ManifestError):
            Info.decode(msgpack.packb(changed, use_bin_type=True))
    with pytest.raises(ManifestError):
        Info.decode(canonical + b"\x00")


def test_non_canonical_manifest_encoding_is_rejected(signed: Manifest) -> None:
    canonical = signed.encode()
    # The key "info" written as str8 instead of fixstr: same values, other bytes.
    wide = canonical.replace(b"\xa4info", b"\xd9\x04info", 1)
    assert wide != canonical
    assert msgpack.unpackb(wide, raw=False) == msgpack.unpackb(canonical, raw=False)
    with pytest.raises(ManifestError, match="canonical"):
        Manifest.decode(wide)


def test_unsupported_version() -> None:
    body = msgpack.unpackb(make_info().encode(), raw=False)
    body["v"] = 2
    with pytest.raises(ManifestError, match="version 2"):
        Info.decode(msgpack.packb(body, use_bin_type=True))


def test_manifest_signature_limits() -> None:
    info = make_info()
    signers = [Identity.from_seed(bytes([i]) * 32) for i in range(MAX_SIGNATURES + 1)]
    m = Manifest(info)
    for ident in signers[:MAX_SIGNATURES]:
        m = m.signed(ident)
    assert len(m.signatures) == MAX_SIGNATURES
    assert m.signed(signers[0]) is m  # already signed: unchanged
    Manifest.decode(m.encode()).verify(info.content_id, trust=signers[5].public_key)
    with pytest.raises(ManifestError, match="limit"):
        m.signed(signers[-1])
    # The same limit on the wire, and no key twice.
    body = msgpack.unpackb(m.encode(), raw=False)
    body["sigs"].append(body["sigs"][0])
    with pytest.raises(ManifestError):
        Manifest.decode(msgpack.packb(body, use_bin_type=True))
    dup = Manifest(info).signed(ALICE).encode()
    body = msgpack.unpackb(dup, raw=False)
    body["sigs"].append(body["sigs"][0])
    with pytest.raises(ManifestError, match="twice"):
        Manifest.decode(msgpack.packb(body, use_bin_type=True))


def test_oversized_input_rejected_before_parsing() -> None:
    with pytest.raises(ManifestError, match="limit"):
        Manifest.decode(b"\x00" * (40 * MiB + 1))
    with pytest.raises(ManifestError, match="limit"):
        Info.decode(b"\x00" * (40 * MiB))


# --- tampering: each kind has its own exception ------------------------------------
def test_flipped_byte_in_chunk(tmp_path: Path) -> None:
    data = os.urandom(2 * CS + 10)
    (tmp_path / "f").write_bytes(data)
    info = build_manifest(tmp_path / "f", chunk_size=CS)
    chunk = bytearray(data[CS : 2 * CS])
    chunk[100] ^= 0x01
    with pytest.raises(ChunkHashMismatch, match="chunk 1"):
        verify_chunk(info, 1, chunk)
    with pytest.raises(ChunkHashMismatch, match="bytes, expected"):
        verify_chunk(info, 2, data[2 * CS :] + b"\x00")
    with pytest.raises(ManifestError, match="out of range"):
        verify_chunk(info, 3, b"")


def test_every_byte_flip_in_info_is_caught(signed: Manifest) -> None:
    encoded = signed.info.encode()
    cid = signed.content_id
    for pos in range(len(encoded)):
        mutated = bytearray(encoded)
        mutated[pos] ^= 0x01
        # A flip either breaks the encoding/validation, or yields a different id.
        try:
            info = Info.decode(bytes(mutated))
        except ManifestError:
            continue
        with pytest.raises(ContentIdMismatch, match="requested"):
            Manifest(info, signed.signatures).verify(cid)


def test_flipped_hash_in_info_fails_root_check(signed: Manifest) -> None:
    body = msgpack.unpackb(signed.info.encode(), raw=False)
    hashes = bytearray(body["hashes"])
    hashes[0] ^= 0x80
    body["hashes"] = bytes(hashes)
    with pytest.raises(ManifestError, match="root does not match"):
        Info.decode(msgpack.packb(body, use_bin_type=True))


def test_changed_name_fails_id_and_signature(signed: Manifest) -> None:
    renamed = Info(
        "other.bin",
        signed.info.size,
        signed.info.chunk_size,
        signed.info.algo,
        signed.info.hashes,
        signed.info.root,
    )
    forged = Manifest(renamed, signed.signatures)
    with pytest.raises(ContentIdMismatch):
        forged.verify(signed.content_id)
    with pytest.raises(SignatureError, match="does not verify"):
        forged.verify()


@pytest.mark.parametrize("which", ["key", "sig"])
def test_flipped_byte_in_signature(signed: Manifest, which: str) -> None:
    ((key, sig),) = signed.signatures
    if which == "sig":
        sig = bytes([sig[0] ^ 0x01]) + sig[1:]
    else:
        key = bytes([key[0] ^ 0x01]) + key[1:]
    tampered = Manifest.decode(Manifest(signed.info, ((key, sig),)).encode())
    with pytest.raises(SignatureError, match="does not verify"):
        tampered.verify(signed.content_id)


def test_one_bad_signature_among_good_ones(signed: Manifest) -> None:
    both = signed.signed(BOB)
    good_key, good_sig = both.signatures[1]
    bad = Manifest(
        both.info, (both.signatures[0], (good_key, good_sig[:-1] + bytes([good_sig[-1] ^ 1])))
    )
    with pytest.raises(SignatureError):
        bad.verify(trust=ALICE.public_key)


def test_unsigned_manifest_refused(signed: Manifest) -> None:
    with pytest.raises(SignatureError, match="not signed"):
        Manifest(signed.info).verify(signed.content_id)


def test_wrong_trust_key(signed: Manifest) -> None:
    with pytest.raises(UntrustedManifest, match=BOB.public_hex):
        signed.verify(signed.content_id, trust=BOB.public_key)
    signed.signed(BOB).verify(signed.content_id, trust=BOB.public_key)
    # Checking order: the id first, then signatures, then trust.
    with pytest.raises(ContentIdMismatch):
        signed.verify(b"\x00" * 32, trust=BOB.public_key)


def test_the_three_integrity_errors_are_distinct() -> None:
    kinds = {ContentIdMismatch, SignatureError, UntrustedManifest, ChunkHashMismatch}
    assert all(issubclass(k, IntegrityError) for k in kinds)
    assert len({k.__name__ for k in kinds}) == 4


# --- names and limits -------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("/etc/passwd", "'/'"),
        ("a\\b", "'\\\\'"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("../x", "'/'"),
        ("nul\x00", "NUL"),
        ("tab\tname", "control"),
        ("esc\x1b[31m", "control"),
        ("del\x7f", "control"),
        ("c1\x9b", "control"),
        (".", "not a file name"),
        ("x" * 256, "limit is 255"),
        ("é" * 128, "limit is 255"),
        ("\udc80", "UTF-8"),
    ],
)
def test_hostile_names(name: str, reason: str) -> None:
    with pytest.raises(ManifestError, match=reason):
        make_info(name=name)


def test_name_limits_accept_valid() -> None:
    for name in ("x" * 255, "é" * 127, ".hidden", "a.b.c", "日本語 file (1).txt", "a . b"):
        assert make_info(name=name).name == name


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_names_fuzz(name: str) -> None:
    try:
        info = make_info(name=name)
    except ManifestError:
        return
    # Anything accepted is one safe path component.
    assert 1 <= len(name.encode()) <= 255
    assert "/" not in name and "\\" not in name and ".." not in name
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for c in name)
    assert Info.decode(info.encode()) == info


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"size": -1}, "out of range"),
        ({"size": 2**50 + 1}, "out of range"),
        ({"size": True}, "integer"),
        ({"chunk_size": 8 * KiB}, "power of two"),
        ({"chunk_size": 128 * MiB}, "power of two"),
        ({"chunk_size": 48 * KiB}, "power of two"),
        ({"algo": "md5"}, "unknown hash algorithm"),
        ({"hashes": b"\x00" * 31}, "hash list"),
        ({"hashes": bytearray(32)}, "bytes"),
        ({"root": b"\x00" * 31}, "root"),
        ({"root": b"\x00" * 32}, "root does not match"),
    ],
)
def test_info_field_limits(kwargs: dict[str, object], reason: str) -> None:
    good = make_info()
    fields = {
        "name": good.name,
        "size": good.size,
        "chunk_size": good.chunk_size,
        "algo": good.algo,
        "hashes": good.hashes,
        "root": good.root,
    }
    fields.update(kwargs)
    with pytest.raises(ManifestError, match=reason):
        Info(**fields)  # type: ignore[arg-type]


def test_too_many_chunks() -> None:
    size = (2**20 + 1) * CS
    with pytest.raises(ManifestError, match="more than the limit"):
        Info("big", size, CS, "blake3", b"", b"\x00" * 32)


def test_empty_file_info() -> None:
    info = make_info(data=b"")
    assert info.num_chunks == 0 and info.hashes == b"" and info.root == hash_chunk("blake3", b"")
    assert Info.decode(info.encode()) == info


# --- content ids --------------------------------------------------------------------
def test_content_id_text_forms(signed: Manifest) -> None:
    cid = signed.content_id
    text = content_id_hex(cid)
    assert len(text) == 64 and text == text.lower()
    assert parse_content_id(text) == cid
    assert parse_content_id(" " + text.upper() + " ") == cid
    assert parse_content_id(text[:16].upper()) == text[:16]
    assert parse_content_id(text[:63]) == text[:63]
    for bad in ["", text[:15], text + "0", "z" * 64, "0x" + text[:20]]:
        with pytest.raises(ManifestError, match="content id"):
            parse_content_id(bad)
    with pytest.raises(ManifestError):
        content_id_hex(cid[:31])


# --- fuzzing the decoders: ManifestError or a valid result, nothing else --------------
def _decode_or_manifest_error(data: bytes) -> None:
    for decode in (Manifest.decode, Info.decode):
        try:
            result = decode(data)
        except ManifestError:
            continue
        assert result.encode() == data  # only canonical encodings are accepted


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_manifest_error(data)


_VALID = Manifest(make_info(data=os.urandom(3 * CS + 1))).signed(ALICE).signed(BOB).encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
            st.integers(min_value=0, max_value=len(_VALID)),
            st.integers(min_value=0, max_value=255),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_mutated_manifest(mutations: list[tuple[str, int, int]]) -> None:
    data = bytearray(_VALID)
    for op, pos, value in mutations:
        pos = min(pos, max(len(data) - 1, 0))
        if op == "flip" and data:
            data[pos] ^= 1 << (value % 8)
        elif op == "set" and data:
            data[pos] = value
        elif op == "insert":
            data.insert(pos, value)
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
    assume(bytes(data) != _VALID)
    _decode_or_manifest_error(bytes(data))
    try:
        m = Manifest.decode(bytes(data))
    except ManifestError:
        return
    # Decoded despite the change: it must fail verification against the original,
    # unless the change only dropped whole signatures (still a genuine manifest).
    original = Manifest.decode(_VALID)
    try:
        m.verify(original.content_id)
    except IntegrityError:
        return
    assert m.info == original.info
    assert set(m.signatures) < set(original.signatures)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats()
        | st.text(max_size=20)
        | st.binary(max_size=40),
        lambda children: (
            st.lists(children, max_size=5)
            | st.dictionaries(
                st.sampled_from(["v", "name", "size", "info", "sigs", "hashes", "root", "x"]),
                children,
                max_size=8,
            )
        ),
        max_leaves=20,
    )
)
def test_fuzz_structured_msgpack(value: object) -> None:
    _decode_or_manifest_error(msgpack.packb(value, use_bin_type=True))


def test_an_unsigned_manifest_does_not_decode(signed: Manifest) -> None:
    # PROTOCOL.md: a manifest carries 1..16 signatures; zero is refused on decoding
    # (an unsigned Manifest object exists only while one is being signed).
    with pytest.raises(ManifestError, match="not signed"):
        Manifest.decode(Manifest(signed.info).encode())
    assert Manifest.decode(signed.encode()) == signed


def test_decode_with_the_expected_id_hashes_before_it_decodes() -> None:
    # A hostile peer's manifest for another id (here: an info that is not
    # even msgpack) costs one hash, never the decoding of its info.
    junk = b"\xc1" * 1000  # 0xc1 is never valid msgpack
    body = msgpack.packb({"info": junk, "sigs": [[b"k" * 32, b"s" * 64]]}, use_bin_type=True)
    with pytest.raises(ManifestError):
        Manifest.decode(body)  # decoded: the info is malformed
    wanted = hashlib.sha256(b"the info of what we asked for").digest()
    with pytest.raises(ContentIdMismatch, match="requested"):
        Manifest.decode(body, expected_id=wanted)
    # The right id decodes as before.
    identity = Identity.generate()
    data = os.urandom(100)
    hashes = hash_chunk("blake3", data)
    info = Info("f.bin", len(data), 16 * 1024, "blake3", hashes, merkle_root("blake3", hashes))
    signed = Manifest(info, ()).signed(identity)
    assert Manifest.decode(signed.encode(), expected_id=info.content_id) == signed
