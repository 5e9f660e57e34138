"""``peer daemon``: a long-running node for one ``$PEER_HOME``, and its control socket."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import trio

from .download import fetch_manifest, output_path, resolve_id
from .errors import PeerError
from .identity import Identity, parse_public_key
from .manifest import Manifest
from .node import Node
from .share import share_file
from .store import ChunkStore
from .swarm import Content

__all__ = ["Daemon", "control_request", "run_daemon", "socket_path", "try_daemon_share"]

log = logging.getLogger("peerd.daemon")

SOCKET_NAME = "control.sock"
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
        self.errors: dict[str, str] = {}
        self._stop = trio.Event()

    def _save(self) -> None:
        blob = json.dumps({"shared": self.shared, "downloads": self.downloads}, indent=1)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(blob)
        os.replace(tmp, self.state_path)

    def _load(self) -> None:
        try:
            state = json.loads(self.state_path.read_text())
            self.shared = {str(k): dict(v) for k, v in state.get("shared", {}).items()}
            self.downloads = {str(k): dict(v) for k, v in state.get("downloads", {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.state_path, exc)

    async def run(self) -> None:
        """Serve until ``stop`` (or cancellation); restores what was served before."""
        self._load()
        path = socket_path(self.home)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(16)
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
        try:
            await share_file(
                self.node,
                self.identity,
                Path(entry["path"]),
                algo=entry.get("hash", "blake3"),
                chunk_size=int(entry.get("chunk", "0")) or None,
            )
        except PeerError as exc:
            self.errors[cid] = str(exc)
            log.warning("cannot share %s again: %s", entry.get("path"), exc)

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
            except ValueError as exc:
                reply = {"ok": False, "error": f"bad control request: {exc}"}
            except PeerError as exc:
                reply = {"ok": False, "error": str(exc)}
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
            return {
                "ok": True,
                "transfers": [self._describe(c) for c in self.node.contents.values()],
                "errors": self.errors,
            }
        if cmd == "ls":
            return {"ok": True, "shared": [{"id": k, **v} for k, v in self.shared.items()]}
        if cmd == "stop":
            self._stop.set()
            return {"ok": True}
        raise ValueError(f"unknown command {cmd!r}")

    def _describe(self, content: Content) -> dict[str, Any]:
        elapsed = max(trio.current_time() - content.started_at, 1e-9)
        return {
            "id": content.content_id.hex(),
            "name": content.info.name,
            "size": content.info.size,
            "have": content.have_bytes,
            "state": "seeding" if content.completed.is_set() else "downloading",
            "peers": len(content.sessions),
            "down_MBps": round(content.downloaded / elapsed / 1e6, 2),
            "uploaded": content.uploaded,
        }

    async def _run_download(
        self, cid: str, path: Path, manifest: Manifest | None, force: bool
    ) -> None:
        self.downloads[cid] = {"path": str(path)}
        self._save()
        try:
            if manifest is None:
                manifest = await fetch_manifest(self.node, bytes.fromhex(cid), None)
            store = await ChunkStore.open(manifest.info, bytes.fromhex(cid), path, force=force)
            content = await self.node.add_content(manifest, store)
            await content.completed.wait()
            await trio.to_thread.run_sync(store.finalize_sync)
            self.downloads.pop(cid, None)
            self.shared[cid] = {"path": str(path), "hash": manifest.info.algo}
            self._save()
        except PeerError as exc:
            self.errors[cid] = str(exc)
            log.warning("download %s failed: %s", cid[:16], exc)


async def run_daemon(home: Path, node: Node, identity: Identity) -> None:
    """Run ``node`` as the daemon of ``home`` until ``peer stop`` or a signal."""
    if control_request(home, {"cmd": "status"}, timeout=5) is not None:
        raise PeerError(f"a daemon already runs for {home}; stop it with `peer stop`")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await Daemon(home, node, identity).run()
        nursery.cancel_scope.cancel()
