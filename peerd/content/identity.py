"""The node's Ed25519 key pair, stored under ``$PEER_HOME``.

The key file ``identity.key`` holds the raw 32-byte private seed and nothing
else. It is created with mode 0600 inside a 0700 directory and written
atomically: the seed goes to a private temporary file (``O_CREAT | O_EXCL``,
mode 0600, fsynced), which is then hard-linked to its final name. Linking, unlike
renaming, never replaces an existing file, so two processes starting for the
first time at once end up sharing one identity instead of silently
overwriting each other's.

Loading refuses a key file that group or others may read or write (the user
fixes it with ``chmod 600``), a symlink, or a file of the wrong size.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from peerd.errors import IdentityError

__all__ = [
    "KEY_FILE",
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "Identity",
    "parse_public_key",
    "peer_home",
    "verify_signature",
]

KEY_FILE = "identity.key"
SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


def peer_home() -> Path:
    """Return the peer state directory: ``$PEER_HOME`` or ``~/.local/share/peer``."""
    env = os.environ.get("PEER_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "peer"


class Identity:
    """An Ed25519 key pair: signs manifests and tracker challenges.

    Use :meth:`load_or_create` for the node's persistent identity, or
    :meth:`from_seed` / :meth:`generate` for one in memory.
    """

    __slots__ = ("_private", "public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Build an identity from a 32-byte private seed.

        Raises:
            IdentityError: the seed is not 32 bytes.
        """
        if len(seed) != SEED_SIZE:
            raise IdentityError(f"an Ed25519 seed is {SEED_SIZE} bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def generate(cls) -> Identity:
        """Return a fresh random identity that lives in memory only."""
        return cls.from_seed(secrets.token_bytes(SEED_SIZE))

    @classmethod
    def load_or_create(cls, home: Path | None = None) -> Identity:
        """Load ``home/identity.key``, creating it (mode 0600) on first use.

        Args:
            home: the state directory; defaults to :func:`peer_home`.

        Raises:
            IdentityError: the key file is readable or writable by group or
                others, is not a regular file, is corrupt, or cannot be
                read or written.
        """
        home = Path(home) if home is not None else peer_home()
        path = home / KEY_FILE
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        _create(home, path)
        try:
            return cls._load(path)
        except FileNotFoundError:
            raise IdentityError(f"key file {path} vanished right after it was created") from None

    @classmethod
    def _load(cls, path: Path) -> Identity:
        try:
            # O_NONBLOCK so a FIFO planted here cannot hang us; no effect on a file.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if path.is_symlink():
                raise IdentityError(
                    f"key file {path} is a symlink; replace it with the key file itself"
                ) from None
            raise IdentityError(f"cannot open key file {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IdentityError(f"key file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise IdentityError(
                    f"key file {path} is accessible by other users "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); fix it with: chmod 600 {path}"
                )
            seed = os.read(fd, SEED_SIZE + 1)
        except OSError as exc:
            raise IdentityError(f"cannot read key file {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if len(seed) != SEED_SIZE:
            raise IdentityError(
                f"key file {path} is corrupt (expected {SEED_SIZE} bytes); "
                "restore it from a backup, or delete it to create a new identity"
            )
        return cls.from_seed(seed)

    @property
    def public_hex(self) -> str:
        """The public key as 64 lowercase hex characters (what ``peer id`` prints)."""
        return self.public_key.hex()

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data``."""
        return self._private.sign(bytes(data))

    def __repr__(self) -> str:
        return f"Identity({self.public_hex})"


def _create(home: Path, path: Path) -> None:
    """Write a new random seed to ``path`` atomically, never replacing an existing file."""
    tmp = home / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # in case an odd umask or ACL interfered
            view = memoryview(secrets.token_bytes(SEED_SIZE))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race; we load its key
        _fsync_dir(home)
    except OSError as exc:
        raise IdentityError(
            f"cannot create key file {path}: {exc.strerror or exc}; check that {home} is writable"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Check an Ed25519 signature.

    Returns:
        True if ``signature`` is a valid signature of ``data`` by ``public_key``;
        False otherwise, including for a malformed key or signature.
    """
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes(public_key))
        key.verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


def parse_public_key(text: str) -> bytes:
    """Parse a public key given as 64 hex characters (surrounding blanks ignored).

    Raises:
        IdentityError: not exactly 64 hex characters.
    """
    cleaned = text.strip().lower()
    if len(cleaned) != 2 * PUBLIC_KEY_SIZE or any(c not in "0123456789abcdef" for c in cleaned):
        raise IdentityError(
            f"not a public key: {text[:80]!r}; expected 64 hex characters (as printed by `peer id`)"
        )
    return bytes.fromhex(cleaned)
