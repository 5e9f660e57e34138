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
import shutil
import socket
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from peerd.app.control import MAX_CONTROL_LINE, control_request, socket_path
from peerd.app.download import (
    _in_order,
    close_store,
    ended_error,
    fetch_manifest,
    obtain_manifest,
    output_path,
    resolve_id,
)
from peerd.app.link import format_address
from peerd.app.share import share_file
from peerd.content.identity import Identity, parse_public_key
from peerd.content.manifest import Manifest
from peerd.content.store import ChunkStore, SourceFile, SourceTree, describe_os_error
from peerd.errors import PeerError, TrackerError
from peerd.node.driver import Content, connection_bytes
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

LOCK_NAME = "daemon.lock"


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
PEER_RATE_EVERY = 1.0  # seconds between samples of each connection's byte counters
PEER_RATE_SPAN = 5  # samples a peer's shown rates are measured over
RETRY_FIRST = 2.0  # seconds before a restored download asks an unreachable tracker again
RETRY_MAX = 60.0  # the longest pause between those tries (doubling)
MIN_PREFIX = 4  # hex characters of an id that name a content the daemon has


class Daemon:
    """A node that serves everything shared or downloaded in one ``$PEER_HOME``.

    What it serves is remembered in ``$PEER_HOME/daemon.json`` so a restarted
    daemon shares (and re-announces) the same files and resumes unfinished
    downloads; a paused content stays paused. It is controlled over a Unix
    socket (mode 0600) with one JSON object per line; docs/DAEMON.md lists
    every command (``share``, ``get``, ``status``, ``ls``, ``rm``, ``pause``,
    ``resume``, ``limit``, ``stop``) and its reply.
    """

    def __init__(self, home: Path, node: Node, identity: Identity) -> None:
        self.home = home
        self.node = node
        self.identity = identity
        self.state_path = home / "daemon.json"
        # content id hex -> {"path", "hash", "chunk"; "downloaded": "1" when this
        # daemon downloaded the file; "paused": "1"}
        self.shared: dict[str, dict[str, str]] = {}
        # content id hex -> {"path"; "sequential": "1"; "paused": "1"}
        self.downloads: dict[str, dict[str, str]] = {}
        self.errors: dict[str, str] = {}  # content id hex -> why it stopped or never ran
        self.names: dict[str, tuple[str, int]] = {}  # content id hex -> (name, size)
        self.results: dict[str, dict[str, Any]] = {}  # finished downloads: their summary
        self.save_error: str | None = None  # why daemon.json could not be written
        self._manifests: dict[str, Manifest] = {}  # what this daemon fetched (resume)
        self._have: dict[str, int] = {}  # verified bytes at the last look (paused rows)
        self._tasks: dict[str, trio.CancelScope] = {}  # running download tasks
        self._done: dict[str, trio.Event] = {}  # set when that download task has ended
        self._peer_samples: dict[tuple[str, str], deque[tuple[float, int, int]]] = {}
        self._nursery: trio.Nursery | None = None
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

    def _manifest_path(self, cid: str) -> Path:
        return self.home / "manifests" / f"{cid}.manifest"

    def _keep_manifest(self, cid: str, manifest: Manifest) -> None:
        """Remember a fetched manifest on disk: after a restart the daemon
        serves that content under its publisher's id and signature, not a
        manifest of its own (whose id would differ). A failure is logged."""
        self._manifests[cid] = manifest
        path = self._manifest_path(cid)
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            tmp.write_bytes(manifest.encode())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("%s", describe_os_error(exc, f"saving {path}"))

    def _kept_manifest(self, cid: str) -> Manifest | None:
        """The manifest of ``cid`` in memory or kept on disk (None: none, or unusable)."""
        manifest = self._manifests.get(cid)
        if manifest is not None:
            return manifest
        path = self._manifest_path(cid)
        try:
            manifest = Manifest.decode(path.read_bytes(), expected_id=bytes.fromhex(cid))
        except FileNotFoundError:
            return None
        except (OSError, PeerError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return None
        if manifest.content_id.hex() != cid:
            log.warning("ignoring %s: it is the manifest of another content", path)
            return None
        self._manifests[cid] = manifest
        return manifest

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
                self._nursery = nursery
                for cid, entry in list(self.shared.items()):
                    if not entry.get("paused"):
                        nursery.start_soon(self._restore_share, cid, entry)
                for cid, entry in list(self.downloads.items()):
                    if not entry.get("paused"):
                        nursery.start_soon(self._start_download, cid)
                nursery.start_soon(self._accept_loop, sock, nursery)
                nursery.start_soon(self._sample_peers)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _restore_share(self, cid: str, entry: dict[str, str]) -> None:
        """Serve a shared file again: with the manifest this daemon has for it
        (a file it downloaded keeps its publisher's id and signature), else by
        sharing the file anew. An unreachable tracker is retried in the
        background (backing off) while the file is served, as ``peer share`` does."""
        self.names.setdefault(cid, (Path(entry.get("path", "?")).name, 0))
        path = Path(entry["path"])
        try:
            manifest = self._kept_manifest(cid)
            if manifest is not None:
                opener = SourceTree.reopen if manifest.info.is_tree else SourceFile
                source = await trio.to_thread.run_sync(opener, path, manifest.info)
                try:
                    await self.node.add_content(manifest, source)
                except BaseException:
                    source.close()
                    raise
                return
            await share_file(
                self.node,
                self.identity,
                path,
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
            return await self._share(request)
        if cmd == "get":
            return await self._get(request)
        if cmd == "status":
            return self._status(request)
        if cmd == "ls":
            return {"ok": True, "shared": self._ls()}
        if cmd == "rm":
            return await self._rm(self._find(request), bool(request.get("delete")))
        if cmd == "pause":
            return await self._pause(self._find(request))
        if cmd == "resume":
            return self._resume(self._find(request))
        if cmd == "limit":
            return self._limit(request)
        if cmd == "stop":
            self._stop.set()
            return {"ok": True}
        raise ValueError(f"unknown command {cmd!r}")

    # --- commands ----------------------------------------------------------------
    async def _share(self, request: dict[str, Any]) -> dict[str, Any]:
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
        return {"ok": True, "id": cid, "name": content.info.name, "size": content.info.size}

    async def _get(self, request: dict[str, Any]) -> dict[str, Any]:
        text = str(request.get("id", ""))
        output = Path(str(request["output"])) if request.get("output") else Path.cwd()
        trust = parse_public_key(str(request["trust"])) if request.get("trust") else None
        peers = [_address(p) for p in request.get("peers") or ()]
        cid_bytes = await resolve_id(self.node, text)
        cid = cid_bytes.hex()
        if cid in self._tasks or cid_bytes in self.node.contents or cid in self.shared:
            entry = self.downloads.get(cid) or self.shared.get(cid) or {}
            held = entry.get("path", "?")
            name, _size = self.names.get(cid, ("", 0))
            if request.get("output") and output_path(output, name) != Path(held):
                raise PeerError(
                    f"the daemon already has {cid[:16]} at {held}; "
                    f"`peer rm {cid[:16]}` first to get it elsewhere"
                )
            return {"ok": True, "id": cid, "path": held, "already": True}
        if self.downloads.get(cid, {}).get("paused"):
            raise PeerError(f"{cid[:16]} is paused in the daemon: `peer resume {cid[:16]}`")
        manifest = await obtain_manifest(self.node, cid_bytes, trust, peers)
        path = output_path(output, manifest.info.name)
        store = await ChunkStore.open(
            manifest.info, cid_bytes, path, force=bool(request.get("force"))
        )
        self._keep_manifest(cid, manifest)
        self.names[cid] = (manifest.info.name, manifest.info.size)
        entry = {"path": str(path)}
        if request.get("sequential"):
            entry["sequential"] = "1"
        self.downloads[cid] = entry
        self.errors.pop(cid, None)
        self.results.pop(cid, None)
        self._save()
        self._spawn(self._run_download, cid, store, peers)
        return {
            "ok": True,
            "id": cid,
            "path": str(path),
            "name": manifest.info.name,
            "size": manifest.info.size,
        }

    def _find(self, request: dict[str, Any]) -> str:
        """The content id hex a request's ``id`` names (a unique prefix will do)."""
        text = str(request.get("id", "")).strip().lower()
        if len(text) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in text):
            raise PeerError(f"{text!r} is not a content id (or a prefix of {MIN_PREFIX}+ hex)")
        known = set(self.shared) | set(self.downloads) | set(self.errors)
        known |= {c.hex() for c in self.node.contents}
        hits = sorted(c for c in known if c.startswith(text))
        if not hits:
            raise PeerError(f"the daemon has no content {text}; `peer status` lists what it has")
        if len(hits) > 1:
            raise PeerError(f"{text} names {len(hits)} contents; give more of the id")
        return hits[0]

    async def _stop_content(self, cid: str) -> None:
        """Stop whatever runs for ``cid`` (download task or content) and wait for it."""
        while cid in self._tasks:  # a resumed download hands over to its run: loop
            done = self._done[cid]
            self._tasks[cid].cancel()
            await done.wait()
        content = self.node.contents.get(bytes.fromhex(cid))
        if content is not None:
            self._have[cid] = content.have_bytes
            self.node.remove_content(content.content_id)
            await content.ended.wait()

    async def _rm(self, cid: str, delete: bool) -> dict[str, Any]:
        await self._stop_content(cid)
        deleted: list[str] = []
        kept: str | None = None
        download = self.downloads.pop(cid, None)
        shared = self.shared.pop(cid, None)
        manifest = self._kept_manifest(cid)
        files = manifest.info.files if manifest is not None else None
        if delete and download is not None:
            path = Path(download["path"])
            for part in (
                path.with_name(path.name + ".part"),
                path.with_name(path.name + ".part.state"),
            ):
                # A tree's .part directory is all ours (a tree with anything
                # else in it is never moved into place): removed whole.
                if await trio.to_thread.run_sync(_unlink, part, files is not None):
                    deleted.append(str(part))
        elif delete and shared is not None:
            if shared.get("downloaded"):
                path = Path(shared["path"])
                if files is not None:
                    gone, left = await trio.to_thread.run_sync(_delete_tree, path, manifest)
                    if gone:
                        deleted.append(shared["path"])
                    if left:
                        kept = f"{left} is not part of the download: kept, with its directories"
                elif await trio.to_thread.run_sync(_unlink, path):
                    deleted.append(shared["path"])
            else:
                kept = f"{shared['path']} is the file you shared: it is never deleted"
        for table in (self.errors, self.results, self._manifests, self._have):
            table.pop(cid, None)
        with contextlib.suppress(OSError):
            self._manifest_path(cid).unlink()
        getattr(self.node, "failed", {}).pop(bytes.fromhex(cid), None)
        self._save()
        reply: dict[str, Any] = {"ok": True, "id": cid, "deleted": deleted}
        if kept is not None:
            reply["kept"] = kept
        return reply

    async def _pause(self, cid: str) -> dict[str, Any]:
        entry = self.downloads.get(cid) or self.shared.get(cid)
        if entry is None:
            raise PeerError(f"{cid[:16]} failed, it is not running: `peer rm {cid[:16]}`")
        await self._stop_content(cid)
        entry["paused"] = "1"
        self.errors.pop(cid, None)
        self._save()
        return {"ok": True, "id": cid}

    def _resume(self, cid: str) -> dict[str, Any]:
        if cid in self.downloads:
            entry = self.downloads[cid]
            if cid in self._tasks:
                return {"ok": True, "id": cid}
            entry.pop("paused", None)
            self.errors.pop(cid, None)
            self._save()
            self._spawn(self._start_download, cid)
        elif cid in self.shared:
            entry = self.shared[cid]
            if bytes.fromhex(cid) in self.node.contents:
                return {"ok": True, "id": cid}
            entry.pop("paused", None)
            self.errors.pop(cid, None)
            self._save()
            self._spawn(self._restore_share, cid, entry)
        else:
            raise PeerError(f"{cid[:16]} failed and is not kept: get or share it again")
        return {"ok": True, "id": cid}

    def _limit(self, request: dict[str, Any]) -> dict[str, Any]:
        for key, limiter in (("up", self.node.up_limiter), ("down", self.node.down_limiter)):
            if key not in request:
                continue
            rate = request[key]
            if rate is not None and (not isinstance(rate, int) or rate < 0):
                raise ValueError(f"{key} must be bytes per second (an integer) or null")
            limiter.set_rate(rate or None)
        return {"ok": True, **self._limits()}

    def _limits(self) -> dict[str, int | None]:
        return {"up": self.node.up_limiter.rate, "down": self.node.down_limiter.rate}

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # --- status ---------------------------------------------------------------------
    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        reply: dict[str, Any] = {
            "ok": True,
            "daemon": {
                "pid": os.getpid(),
                "home": str(self.home),
                "listen": format_address(node.host, node.port) if hasattr(node, "host") else "",
                "port": getattr(node, "port", 0),
                "tracker": format_address(*node.tracker_address)
                if hasattr(node, "tracker_address")
                else "",
                **(self._limits() if hasattr(node, "up_limiter") else {}),
            },
            "transfers": self._transfers(),
            "errors": self.errors,
        }
        if request.get("id"):
            cid = self._find(request)
            reply["transfers"] = [t for t in reply["transfers"] if t["id"] == cid]
            content = node.contents.get(bytes.fromhex(cid))
            reply["peers"] = [] if content is None else self._peer_list(cid, content)
        if self.save_error is not None:
            reply["state_error"] = self.save_error
        return reply

    def _ls(self) -> list[dict[str, Any]]:
        rows = []
        for cid, entry in self.shared.items():
            name, size = self.names.get(cid, (Path(entry.get("path", "?")).name, 0))
            state = self._state_of(cid)
            rows.append(
                {
                    "id": cid,
                    "path": entry.get("path", ""),
                    "name": name,
                    "size": size,
                    "state": state,
                }
            )
        return rows

    def _state_of(self, cid: str) -> str:
        content = self.node.contents.get(bytes.fromhex(cid))
        if content is not None:
            return "seeding" if content.completed.is_set() else "downloading"
        entry = self.downloads.get(cid) or self.shared.get(cid) or {}
        if entry.get("paused"):
            return "paused"
        failed: dict[bytes, str] = getattr(self.node, "failed", {})
        message = self.errors.get(cid) or failed.get(bytes.fromhex(cid))
        if message is not None:
            return _failed_state(message)
        return "starting" if cid in self._tasks or entry else "stopped"

    def _transfers(self) -> list[dict[str, Any]]:
        """Every running content, then every paused one, then every one that
        ended with an error."""
        rows = [self._describe(c) for c in self.node.contents.values()]
        listed = {row["id"] for row in rows}
        failed: dict[bytes, str] = getattr(self.node, "failed", {})
        others = [*self.downloads, *self.shared, *(c.hex() for c in failed), *self.errors]
        for cid in dict.fromkeys(others):
            if cid in listed:
                continue
            listed.add(cid)
            entry = self.downloads.get(cid) or self.shared.get(cid) or {}
            name, size = self.names.get(cid, (Path(entry.get("path", "?")).name, 0))
            have = size if cid in self.shared else self._have.get(cid, 0)
            rows.append(
                {
                    "id": cid,
                    "name": name,
                    "size": size,
                    "have": have,
                    "state": self._state_of(cid),
                    "peers": 0,
                    "down_MBps": 0.0,
                    "up_MBps": 0.0,
                    "eta_s": None,
                    "uploaded": 0,
                    "path": entry.get("path"),
                }
            )
            if cid in self.results:
                rows[-1]["result"] = self.results[cid]
        return rows

    def _describe(self, content: Content) -> dict[str, Any]:
        down, up = content.rates()  # over the last few seconds, not since start
        have, size = content.have_bytes, content.info.size
        done = content.completed.is_set()
        cid = content.content_id.hex()
        self._have[cid] = have
        entry = self.downloads.get(cid) or self.shared.get(cid) or {}
        row = {
            "id": cid,
            "name": content.info.name,
            "size": size,
            "have": have,
            "state": "seeding" if done else "downloading",
            "peers": len(content.sessions),
            "down_MBps": round(down / 1e6, 2),
            "up_MBps": round(up / 1e6, 2),
            "eta_s": None if done or down <= 0 else round((size - have) / down),
            "uploaded": content.uploaded,
            "path": entry.get("path"),
        }
        if cid in self.results:
            row["result"] = self.results[cid]
        return row

    def _peer_list(self, cid: str, content: Content) -> list[dict[str, Any]]:
        """The connected peers of ``content``: address, key, bytes and rates each way."""
        rows = []
        for session in content.sessions:
            samples = self._peer_samples.get((cid, session.name))
            down = up = 0.0
            sent = received = 0
            if samples:
                (t0, sent0, recv0), (t1, sent, received) = samples[0], samples[-1]
                if t1 > t0:
                    up, down = (sent - sent0) / (t1 - t0), (received - recv0) / (t1 - t0)
            host, port = session.address
            rows.append(
                {
                    "address": format_address(host, port),
                    "key": session.remote_key.hex(),
                    "sent": sent,
                    "received": received,
                    "verified_from": content.bytes_from.get(session.name, 0),
                    "down_MBps": round(down / 1e6, 2),
                    "up_MBps": round(up / 1e6, 2),
                    "direction": "out" if session.initiated else "in",
                }
            )
        return rows

    async def _sample_peers(self) -> None:
        """Each second, every connection's byte counters (kernel's TCP_INFO): peer rates."""
        while True:
            now = trio.current_time()
            seen: set[tuple[str, str]] = set()
            for content in list(self.node.contents.values()):
                cid = content.content_id.hex()
                for session in content.sessions:
                    counts = connection_bytes(session.stream.fileno())
                    if counts is None:
                        continue
                    key = (cid, session.name)
                    seen.add(key)
                    samples = self._peer_samples.setdefault(key, deque(maxlen=PEER_RATE_SPAN + 1))
                    samples.append((now, *counts))
            for key in set(self._peer_samples) - seen:
                del self._peer_samples[key]
            await trio.sleep(PEER_RATE_EVERY)

    # --- downloads --------------------------------------------------------------------
    async def _start_download(self, cid: str) -> None:
        """Resume a download remembered in ``daemon.json`` (or paused): its
        manifest from memory, else from the tracker (retried with backoff
        while the tracker cannot be reached), then its ``.part``."""
        entry = self.downloads.get(cid)
        if entry is None:
            return
        scope = trio.CancelScope()
        done = trio.Event()
        self._tasks[cid], self._done[cid] = scope, done
        store: ChunkStore | None = None
        try:
            with scope:
                manifest = self._kept_manifest(cid)
                pause = RETRY_FIRST
                while manifest is None:
                    try:
                        manifest = await fetch_manifest(self.node, bytes.fromhex(cid), None)
                    except TrackerError as exc:
                        if exc.code != "unreachable":
                            raise
                        self.errors[cid] = f"waiting for the tracker: {exc}"
                        log.info("download %s: %s; retrying in %.0f s", cid[:16], exc, pause)
                        await trio.sleep(pause)
                        pause = min(pause * 2, RETRY_MAX)
                self.errors.pop(cid, None)
                self._keep_manifest(cid, manifest)
                self.names[cid] = (manifest.info.name, manifest.info.size)
                store = await ChunkStore.open(
                    manifest.info, bytes.fromhex(cid), Path(entry["path"]), force=False
                )
        except (PeerError, OSError) as exc:
            self._failed(cid, exc)
        finally:
            if self._tasks.get(cid) is scope:
                del self._tasks[cid]
            done.set()
        if store is not None:
            await self._run_download(cid, store, [])

    async def _run_download(
        self, cid: str, store: ChunkStore, peers: list[tuple[str, int]]
    ) -> None:
        """Download into ``store`` until complete (then seed it), cancelled
        (``rm``/``pause``: the store is closed, verified chunks kept) or failed."""
        scope = trio.CancelScope()
        self._tasks[cid] = scope
        done = self._done[cid] = trio.Event()
        manifest = self._manifests[cid]
        entry = self.downloads[cid]
        content: Content | None = None
        finished = False
        started = trio.current_time()
        try:
            with scope:
                content = await self.node.add_content(manifest, store)
                for ip, port in peers:
                    content.dial(ip, port)
                if entry.get("sequential"):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._until_complete, content)
                        await _in_order(content, store, None)
                await self._until_complete(content)
                await trio.to_thread.run_sync(store.finalize_sync)
                finished = True
                seconds = max(trio.current_time() - started, 1e-9)
                self.results[cid] = {
                    "path": entry["path"],
                    "bytes": manifest.info.size,
                    "seconds": round(seconds, 3),
                    "MBps": round(content.downloaded / seconds / 1e6, 1),
                    "peers_used": sum(1 for v in content.bytes_from.values() if v),
                    "bytes_per_peer": dict(content.bytes_from),
                    "hash_failures": content.hash_failures,
                    "resumed_bytes": store.resumed_bytes,
                }
                self.downloads.pop(cid, None)
                self.shared[cid] = {
                    "path": entry["path"],
                    "hash": manifest.info.algo,
                    "chunk": str(manifest.info.chunk_size),
                    "downloaded": "1",
                }
                self._save()
        except (PeerError, OSError) as exc:
            self._failed(cid, exc)
        finally:
            if not finished:
                await close_store(self.node, content, store)
            if self._tasks.get(cid) is scope:
                del self._tasks[cid]
            done.set()

    def _failed(self, cid: str, exc: PeerError | OSError) -> None:
        self.errors[cid] = str(exc) if isinstance(exc, PeerError) else _os_message(exc)
        log.warning("download %s failed: %s", cid[:16], self.errors[cid])

    async def _until_complete(self, content: Content) -> None:
        """Wait for ``content`` to complete; raise its error if it ends first."""
        while not content.completed.is_set():
            with trio.move_on_after(1.0):
                await content.completed.wait()
            if not content.completed.is_set():
                ended = ended_error(self.node, content)
                if ended is not None:
                    raise ended


def _failed_state(message: str) -> str:
    if message.startswith("source changed"):
        return "source changed"
    if message.startswith("waiting for the tracker"):
        return message
    return f"failed: {message}"


def _address(value: object) -> tuple[str, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or not 0 < value[1] < 65536
    ):
        raise ValueError("peers must be [host, port] pairs")
    return value[0], value[1]


def _unlink(path: Path, whole_tree: bool = False) -> bool:
    """Remove a file (or, with ``whole_tree``, a directory and all in it);
    False if there was none."""
    try:
        if whole_tree and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    return True


def _delete_tree(path: Path, manifest: Manifest | None) -> tuple[bool, str | None]:
    """Remove a downloaded tree: the files and empty directories its
    manifest lists, then each directory left empty, deepest first. Anything
    else found there is kept. Returns (anything removed, one path kept)."""
    info = manifest.info if manifest is not None else None
    if info is None or info.files is None:
        return _unlink(path), None
    removed = False
    dirs = {path}

    def under(target: Path) -> None:  # the directories from ``path`` down to target's
        for parent in target.parents:
            if parent == path or path not in parent.parents:
                break
            dirs.add(parent)

    for rel, _size in info.files:
        target = path / rel
        under(target)
        if target.is_symlink() or target.is_file():
            target.unlink()
            removed = True
    for rel in info.dirs or ():
        dirs.add(path / rel)
        under(path / rel)
    left: str | None = None
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
            removed = True
        except FileNotFoundError:
            pass
        except OSError:
            if left is None:
                left = next((str(c) for c in d.iterdir() if not c.is_dir()), str(d))
    return removed, left


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
