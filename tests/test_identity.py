"""The on-disk identity: creation, permissions, corruption, signing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from peerd.content.identity import Identity, parse_public_key, peer_home, verify_signature
from peerd.errors import IdentityError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_peer_home_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEER_HOME", str(tmp_path / "h"))
    assert peer_home() == tmp_path / "h"
    monkeypatch.delenv("PEER_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert peer_home() == tmp_path / ".local" / "share" / "peer"


def test_create_then_reload(tmp_path: Path) -> None:
    home = tmp_path / "a" / "home"
    ident = Identity.load_or_create(home)
    key = home / "identity.key"
    assert mode(key) == 0o600
    assert mode(home) == 0o700
    assert key.stat().st_size == 32
    assert [p.name for p in home.iterdir()] == ["identity.key"]  # no temporary left over
    again = Identity.load_or_create(home)
    assert again.public_key == ident.public_key
    assert len(ident.public_key) == 32
    assert ident.public_hex == ident.public_key.hex()
    assert len(ident.public_hex) == 64 and ident.public_hex == ident.public_hex.lower()


def test_default_home_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEER_HOME", str(tmp_path / "envhome"))
    ident = Identity.load_or_create()
    assert (tmp_path / "envhome" / "identity.key").exists()
    assert Identity.load_or_create(tmp_path / "envhome").public_key == ident.public_key


def test_created_private_despite_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Identity.load_or_create(tmp_path / "h")
    finally:
        os.umask(old)
    assert mode(tmp_path / "h" / "identity.key") == 0o600
    assert mode(tmp_path / "h") == 0o700


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_refuses_key_open_to_others(tmp_path: Path, bad_mode: int) -> None:
    Identity.load_or_create(tmp_path)
    key = tmp_path / "identity.key"
    key.chmod(bad_mode)
    with pytest.raises(IdentityError) as info:
        Identity.load_or_create(tmp_path)
    message = str(info.value)
    assert str(key) in message
    assert f"chmod 600 {key}" in message
    key.chmod(0o600)
    Identity.load_or_create(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x01" * 31, b"\x01" * 33, b"\x00" * 1000])
def test_corrupt_key_file(tmp_path: Path, content: bytes) -> None:
    key = tmp_path / "identity.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(IdentityError, match="corrupt"):
        Identity.load_or_create(tmp_path)
    assert key.read_bytes() == content  # never overwritten


def test_key_file_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "identity.key").mkdir(mode=0o700)
    with pytest.raises(IdentityError, match="not a regular file"):
        Identity.load_or_create(tmp_path)


def test_key_file_fifo_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "identity.key", 0o600)
    with pytest.raises(IdentityError, match="not a regular file"):
        Identity.load_or_create(tmp_path)


def test_key_file_symlink_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    Identity.load_or_create(real)
    (tmp_path / "identity.key").symlink_to(real / "identity.key")
    with pytest.raises(IdentityError, match="symlink"):
        Identity.load_or_create(tmp_path)


def test_home_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "home").write_bytes(b"x")
    with pytest.raises(IdentityError, match="cannot"):
        Identity.load_or_create(tmp_path / "home")


def test_same_seed_same_key_and_file_is_the_seed(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path)
    seed = (tmp_path / "identity.key").read_bytes()
    assert Identity.from_seed(seed).public_key == ident.public_key
    with pytest.raises(IdentityError):
        Identity.from_seed(seed[:31])


def test_sign_and_verify() -> None:
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"hello")
    assert len(sig) == 64
    assert verify_signature(a.public_key, sig, b"hello")
    assert not verify_signature(a.public_key, sig, b"hellO")
    assert not verify_signature(b.public_key, sig, b"hello")
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_signature(a.public_key, flipped, b"hello")
    assert not verify_signature(a.public_key[:31], sig, b"hello")
    assert not verify_signature(a.public_key, sig[:63], b"hello")


def test_parse_public_key() -> None:
    ident = Identity.generate()
    assert parse_public_key(ident.public_hex) == ident.public_key
    assert parse_public_key(" " + ident.public_hex.upper() + "\n") == ident.public_key
    for bad in ["", "ab", ident.public_hex[:63], ident.public_hex + "0", "g" * 64, "+" * 64]:
        with pytest.raises(IdentityError, match="64 hex"):
            parse_public_key(bad)
