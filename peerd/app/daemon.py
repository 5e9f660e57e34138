"""``peer daemon``: a long-running node for one ``$PEER_HOME``, and its control socket.

One daemon per ``$PEER_HOME``: it holds an ``flock`` on ``daemon.lock`` (with
its pid in it) for its whole life, so a second one refuses to start before it
touches the control socket, which only the lock holder may replace or remove.
The socket is bound in a private (0700) directory, made 0600 and then renamed
into place, so it is never reachable with looser permissions and the
process-wide umask is never changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from peerd.app.download import (
    close_store,
    ended_error,
    fetch_manifest,
    output_path,
    resolve_id,
)
from peerd.app.share import share_file
from peerd.content.identity import Identity, parse_public_key
from peerd.content.manifest import Manifest
from peerd.content.store import ChunkStore, describe_os_error
from peerd.errors import PeerError
from peerd.node.driver import Content
from peerd.node.node import Node

__all__ = [
    "Daemon",
    "DaemonLock",
    "control_request",
    "run_daemon",
    "socket_path",
    "try_daemon_share",
]

log = logging.getLogger("peerd.app.daemon")

SOCKET_NAME = "control.sock"
LOCK_NAME = "daemon.lock"
MAX_CONTROL_LINE = 1 << 20


def socket_path(home: Path) -> Path:
    return home / SOCKET_NAME


def control_request(
    home: Path, request: dict[str, Any], timeout: float = 600.0
) -> dict[str, Any] | None:
    """Send one JSON request to the daemon of ``home``; None when no daemon runs.

    Raises:
        PeerError: the daemon answered with an error.
    """
    path = socket_path(home)
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a stale socket from a daemon that died
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_CONTROL_LINE:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except OSError as exc:
        raise PeerError(f"talking to the daemon at {path} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise PeerError(f"the daemon at {path} sent a garbled reply") from None
    if not isinstance(reply, dict):
        raise PeerError(f"the daemon at {path} sent a garbled reply")
    if not reply.get("ok"):
        raise PeerError(str(reply.get("error", "the daemon refused the request")))
    return reply


def try_daemon_share(
    home: Path, path: Path, algo: str, chunk_size: int | None = None
) -> str | None:
    """Hand ``path`` to a running daemon; its content id, or None if no daemon runs."""
    request = {"cmd": "share", "path": str(path.resolve()), "hash": algo, "chunk": chunk_size or 0}
    reply = control_request(home, request)
    return None if reply is None else str(reply["id"])


class DaemonLock:
    """The one-daemon-per-``$PEER_HOME`` lock: ``flock`` on ``daemon.lock``, held open.

    Raises (from :meth:`acquire`):
        PeerError: another daemon holds it (its pid is named), or the lock
            file cannot be opened.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def acquire(cls, home: Path) -> DaemonLock:
        path = home / LOCK_NAME
        try:
            home.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise describe_os_error(exc, f"opening {path}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            pid = text if text.isdigit() else "unknown"
            raise PeerError(
                f"a daemon is already running (pid {pid}) for {home}; stop it with `peer stop`"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise describe_os_error(exc, f"locking {path}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            log.warning("could not write the pid into %s: %s", path, exc)
        return cls(fd)

    def release(self) -> None:
        """Let the next daemon start (the file stays: removing it would race)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


def bind_control_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the moment it is reachable.

    Bound in a fresh 0700 directory beside ``path``, chmod-ed, then renamed
    over ``path`` (the caller holds the :class:`DaemonLock`, so what it
    replaces is a dead daemon's socket).

    Raises:
        PeerError: the socket cannot be created there.
    """
    tmpdir = tempfile.mkdtemp(prefix=".control-", dir=path.parent)
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(16)
        os.replace(tmp, path)
    except OSError as exc:
        sock.close()
        raise describe_os_error(exc, f"creating the control socket {path}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    return sock


# --- the daemon itself ---------------------------------------------------------------
class Daemon:
    """A node that serves everything shared or downloaded in one ``$PEER_HOME``.

    What it serves is remembered in ``$PEER_HOME/daemon.json`` so a restarted
    daemon shares (and re-announces) the same files and resumes unfinished
    downloads. It is controlled over a Unix socket (mode 0600) with one JSON
    object per line: ``share``, ``get``, ``status``, ``ls``, ``stop``.
    """

    def __init__(self, home: Path, node: Node, identity: Identity) -> None:
        self.home = home
        self.node = node
        self.identity = identity
        self.state_path = home / "daemon.json"
        self.shared: dict[str, dict[str, str]] = {}  # content id hex -> {"path", "hash"}
        self.downloads: dict[str, dict[str, str]] = {}  # content id hex -> {"path"}
        self.errors: dict[str, str] = {}  # content id hex -> why it stopped or never ran
        self.names: dict[str, tuple[str, int]] = {}  # content id hex -> (name, size)
        self.save_error: str | None = None  # why daemon.json could not be written
        self._stop = trio.Event()

    def _save(self) -> None:
        """Write ``daemon.json``; a failure is logged and shown by ``status``, never raised."""
        blob = json.dumps({"shared": self.shared, "downloads": self.downloads}, indent=1)
        tmp = self.state_path.with_suffix(".tmp")
        try:
            tmp.write_text(blob)
            os.replace(tmp, self.state_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.save_error = str(describe_os_error(exc, f"saving {self.state_path}"))
            log.warning("%s", self.save_error)
            return
        self.save_error = None

    def _load(self) -> None:
        try:
            state = json.loads(self.state_path.read_text())
            self.shared = {str(k): dict(v) for k, v in state.get("shared", {}).items()}
            self.downloads = {str(k): dict(v) for k, v in state.get("downloads", {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.state_path, exc)

    async def run(self, started: Callable[[], None] | None = None) -> None:
        """Serve until ``stop`` (or cancellation); restores what was served before.

        The caller holds the :class:`DaemonLock` of ``home``. ``started`` is
        called once the control socket accepts requests.
        """
        self._load()
        path = socket_path(self.home)
        sock = trio.socket.from_stdlib_socket(bind_control_socket(path))
        if started is not None:
            started()
        try:
            async with trio.open_nursery() as nursery:
                for cid, entry in list(self.shared.items()):
                    nursery.start_soon(self._restore_share, cid, entry)
                for cid, entry in list(self.downloads.items()):
                    nursery.start_soon(self._run_download, cid, Path(entry["path"]), None, False)
                nursery.start_soon(self._accept_loop, sock, nursery)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _restore_share(self, cid: str, entry: dict[str, str]) -> None:
        self.names.setdefault(cid, (Path(entry.get("path", "?")).name, 0))
        try:
            await share_file(
                self.node,
                self.identity,
                Path(entry["path"]),
                algo=entry.get("hash", "blake3"),
                chunk_size=int(entry.get("chunk", "0")) or None,
            )
        except (PeerError, OSError) as exc:
            self.errors[cid] = str(exc) if isinstance(exc, PeerError) else _os_message(exc)
            log.warning("cannot share %s again: %s", entry.get("path"), self.errors[cid])

    async def _accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            conn, _ = await sock.accept()
            nursery.start_soon(self._serve_client, conn)

    async def _serve_client(self, conn: trio.socket.SocketType) -> None:
        with conn:
            data = b""
            with trio.move_on_after(10):
                while not data.endswith(b"\n") and len(data) < MAX_CONTROL_LINE:
                    part = await conn.recv(65536)
                    if not part:
                        break
                    data += part
            try:
                request = json.loads(data)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                reply = await self._handle(request)
            except (ValueError, TypeError, KeyError) as exc:
                reply = {"ok": False, "error": f"bad control request: {exc}"}
            except PeerError as exc:
                reply = {"ok": False, "error": str(exc)}
            except OSError as exc:
                reply = {"ok": False, "error": _os_message(exc)}
            out = memoryview(json.dumps(reply).encode() + b"\n")
            with contextlib.suppress(OSError):
                while out:
                    out = out[await conn.send(out) :]

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "share":
            path = Path(str(request.get("path", "")))
            algo = str(request.get("hash", "blake3"))
            chunk = request.get("chunk") or None
            if chunk is not None and not isinstance(chunk, int):
                raise ValueError("chunk must be an integer")
            content = await share_file(self.node, self.identity, path, algo=algo, chunk_size=chunk)
            cid = content.content_id.hex()
            self.errors.pop(cid, None)
            self.names[cid] = (content.info.name, content.info.size)
            self.shared[cid] = {"path": str(path), "hash": algo, "chunk": str(chunk or 0)}
            self._save()
            return {"ok": True, "id": cid}
        if cmd == "get":
            text = str(request.get("id", ""))
            output = Path(str(request["output"])) if request.get("output") else Path.cwd()
            trust = parse_public_key(str(request["trust"])) if request.get("trust") else None
            cid_bytes = await resolve_id(self.node, text)
            manifest = await fetch_manifest(self.node, cid_bytes, trust)
            path = output_path(output, manifest.info.name)
            self.node.nursery.start_soon(
                self._run_download, cid_bytes.hex(), path, manifest, bool(request.get("force"))
            )
            return {"ok": True, "id": cid_bytes.hex(), "path": str(path)}
        if cmd == "status":
            reply: dict[str, Any] = {
                "ok": True,
                "transfers": self._transfers(),
                "errors": self.errors,
            }
            if self.save_error is not None:
                reply["state_error"] = self.save_error
            return reply
        if cmd == "ls":
            return {"ok": True, "shared": [{"id": k, **v} for k, v in self.shared.items()]}
        if cmd == "stop":
            self._stop.set()
            return {"ok": True}
        raise ValueError(f"unknown command {cmd!r}")

    def _transfers(self) -> list[dict[str, Any]]:
        """Every running content, then every one that ended with an error."""
        rows = [self._describe(c) for c in self.node.contents.values()]
        active = {row["id"] for row in rows}
        failed: dict[bytes, str] = getattr(self.node, "failed", {})
        ended = {cid.hex(): message for cid, message in failed.items()}
        ended.update(self.errors)
        for cid, message in ended.items():
            if cid in active:
                continue
            name, size = self.names.get(cid, ("?", 0))
            rows.append(
                {
                    "id": cid,
                    "name": name,
                    "size": size,
                    "have": 0,
                    "state": f"failed: {message}",
                    "peers": 0,
                    "down_MBps": 0.0,
                    "up_MBps": 0.0,
                    "eta_s": None,
                    "uploaded": 0,
                }
            )
        return rows

    def _describe(self, content: Content) -> dict[str, Any]:
        down, up = content.rates()  # over the last few seconds, not since start
        have, size = content.have_bytes, content.info.size
        done = content.completed.is_set()
        return {
            "id": content.content_id.hex(),
            "name": content.info.name,
            "size": size,
            "have": have,
            "state": "seeding" if done else "downloading",
            "peers": len(content.sessions),
            "down_MBps": round(down / 1e6, 2),
            "up_MBps": round(up / 1e6, 2),
            "eta_s": None if done or down <= 0 else round((size - have) / down),
            "uploaded": content.uploaded,
        }

    async def _run_download(
        self, cid: str, path: Path, manifest: Manifest | None, force: bool
    ) -> None:
        self.downloads[cid] = {"path": str(path)}
        self.errors.pop(cid, None)
        self._save()
        store: ChunkStore | None = None
        content: Content | None = None
        finished = False
        try:
            if manifest is None:
                manifest = await fetch_manifest(self.node, bytes.fromhex(cid), None)
            self.names[cid] = (manifest.info.name, manifest.info.size)
            store = await ChunkStore.open(manifest.info, bytes.fromhex(cid), path, force=force)
            content = await self.node.add_content(manifest, store)
            await self._until_complete(content)
            await trio.to_thread.run_sync(store.finalize_sync)
            finished = True
            self.downloads.pop(cid, None)
            self.shared[cid] = {"path": str(path), "hash": manifest.info.algo}
            self._save()
        except (PeerError, OSError) as exc:
            self.errors[cid] = str(exc) if isinstance(exc, PeerError) else _os_message(exc)
            log.warning("download %s failed: %s", cid[:16], self.errors[cid])
        finally:
            if store is not None and not finished:
                await close_store(self.node, content, store)

    async def _until_complete(self, content: Content) -> None:
        """Wait for ``content`` to complete; raise its error if it ends first."""
        while not content.completed.is_set():
            with trio.move_on_after(1.0):
                await content.completed.wait()
            if not content.completed.is_set():
                ended = ended_error(self.node, content)
                if ended is not None:
                    raise ended


def _os_message(exc: OSError) -> str:
    return str(describe_os_error(exc, exc.filename or "a file operation"))


async def run_daemon(
    home: Path, node: Node, identity: Identity, started: Callable[[], None] | None = None
) -> None:
    """Run ``node`` as the daemon of ``home`` until ``peer stop`` or a signal.

    Raises:
        PeerError: a daemon already runs for ``home`` (nothing of it is touched).
    """
    lock = DaemonLock.acquire(home)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await Daemon(home, node, identity).run(started)
            nursery.cancel_scope.cancel()
    finally:
        lock.release()
