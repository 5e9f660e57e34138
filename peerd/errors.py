"""The small exception hierarchy of peer, split by layer.

Every exception carries a message a user can act on; the CLI prints
``str(exc)`` on one line and exits non-zero. Backend exceptions (OSError,
trio errors, msgpack errors, cryptography errors) are translated into these at
the boundary of the layer that sees them.
"""

from __future__ import annotations

__all__ = [
    "ChunkHashMismatch",
    "ConnectError",
    "ConnectionClosed",
    "ConnectionReset",
    "ContentError",
    "ContentIdMismatch",
    "IdentityError",
    "IntegrityError",
    "LocalProtocolError",
    "ManifestError",
    "PeerError",
    "ProtocolError",
    "RemoteProtocolError",
    "SignatureError",
    "StorageError",
    "TrackerError",
    "TransportError",
    "TransportTimeout",
    "TransportUnavailable",
    "UntrustedManifest",
]


class PeerError(Exception):
    """Base of every error peer raises on purpose."""


# --- protocol ---------------------------------------------------------------
class ProtocolError(PeerError):
    """The wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The remote side sent something invalid; close that connection only."""


# --- transport --------------------------------------------------------------
class TransportError(PeerError):
    """Moving bytes failed."""


class ConnectError(TransportError):
    """Could not open a connection (refused, unreachable, bad address)."""


class ConnectionClosed(TransportError):
    """The remote side closed the connection (EOF) where data was expected."""


class ConnectionReset(TransportError):
    """The connection was reset or broken by the remote side."""


class TransportTimeout(TransportError):
    """An operation did not finish within its deadline."""


class TransportUnavailable(TransportError):
    """The selected transport cannot run on this machine (says why)."""


# --- content ----------------------------------------------------------------
class ContentError(PeerError):
    """A manifest or chunk is not acceptable."""


class ManifestError(ContentError):
    """A manifest is malformed: bad name, sizes, counts or encoding."""


class IntegrityError(ContentError):
    """Data does not match what was signed or hashed."""


class ContentIdMismatch(IntegrityError):
    """The manifest info does not hash to the content id that was asked for."""


class SignatureError(IntegrityError):
    """A signature on a manifest does not verify."""


class UntrustedManifest(IntegrityError):
    """The manifest is not signed by the key the user said to trust."""


class ChunkHashMismatch(IntegrityError):
    """A chunk's bytes do not hash to the hash listed in the manifest."""


# --- local ------------------------------------------------------------------
class IdentityError(PeerError):
    """The user's key pair cannot be used (unsafe permissions, corrupt file)."""


class StorageError(PeerError):
    """Local disk problem: output not writable, disk full, state file corrupt."""


# --- tracker ----------------------------------------------------------------
class TrackerError(PeerError):
    """The tracker refused a request or could not be used.

    ``code`` is the tracker's error code (docs/PROTOCOL.md), e.g. ``not-found``,
    ``ambiguous-prefix``, ``auth-failed``, or ``unreachable`` when we could not
    talk to it at all.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
