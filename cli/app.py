"""The ``peer`` command: thin; parses arguments, runs the library, maps errors.

Every expected failure is a :class:`~peerd.errors.PeerError`; it is printed
as one line (``peer: error: ...``) with a non-zero exit code, never a
traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.config import Config
from peerd.app.link import Link, format_address, is_link, parse_address, parse_link
from peerd.content.identity import Identity, parse_public_key, peer_home
from peerd.errors import PeerError
from peerd.units import parse_rate, parse_size

if TYPE_CHECKING:
    import trio

    from peerd.node.node import Node

app = typer.Typer(
    add_completion=True,  # --install-completion / --show-completion
    no_args_is_help=True,
)


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from peerd.wire import PROTOCOL_VERSION

    try:
        ours = version("peer")
    except PackageNotFoundError:
        ours = "(not installed)"
    typer.echo(f"peer {ours} (protocol {PROTOCOL_VERSION})")
    raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            metavar="",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """peer: share files with verified, signed chunks over a peer-to-peer swarm.

    Environment: PEER_HOME (your key, caches and daemon state; default
    ~/.local/share/peer), PEER_TRACKER (HOST:PORT), PEER_TRANSPORT (reactor or
    proactor). Downloads go to the current directory unless -o says otherwise.
    Defaults can be set in $PEER_HOME/config.toml (tracker, host, port,
    up_limit, down_limit, download_dir, transport); a flag beats an
    environment variable, which beats the config file.
    Exit codes: 0 ok, 1 failure, 2 usage, 130 interrupted.
    """
    global _config
    from cli.config import load_config

    try:
        _config = load_config(peer_home())
    except PeerError as exc:
        fail(str(exc))
    ctx.default_map = _config.command_defaults()


EXIT_ERROR = 1
_config = Config()  # $PEER_HOME/config.toml, read by the root callback
EXIT_INTERRUPTED = 130
DEFAULT_TRACKER = "127.0.0.1:7070"

TrackerOpt = Annotated[
    str | None,
    typer.Option(
        "--tracker",
        metavar="HOST:PORT",
        help="Tracker HOST:PORT, or several as A,B,C (used in turn when one fails; "
        "default $PEER_TRACKER or 127.0.0.1:7070).",
    ),
]
HostOpt = Annotated[
    str,
    typer.Option(
        "--host",
        metavar="ADDR",
        help="Address to listen on; default :: = every interface, IPv6 and IPv4.",
    ),
]
PortOpt = Annotated[
    int,
    typer.Option("--port", metavar="PORT", help="Port to listen on, 1-65535; 0 = any free port."),
]
BindOpt = Annotated[
    str | None,
    typer.Option(
        "--bind",
        metavar="ADDR",
        help="Connect from this local address (default: the system's choice).",
    ),
]
ANY_HOST = "::"
TransportOpt = Annotated[
    str | None,
    typer.Option(
        "--transport",
        metavar="NAME",
        help="reactor (epoll) or proactor (io_uring); default $PEER_TRANSPORT or reactor.",
    ),
]
UpOpt = Annotated[
    str | None,
    typer.Option("--up-limit", metavar="RATE", help="Upload limit per second, e.g. 32MiB."),
]
DownOpt = Annotated[
    str | None,
    typer.Option("--down-limit", metavar="RATE", help="Download limit per second, e.g. 10MB."),
]
TrustOpt = Annotated[
    str | None,
    typer.Option("--trust", metavar="KEY", help="Refuse a manifest not signed by this public key."),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", metavar="", help="Log what the node does.")
]


class Interrupted(PeerError):
    """Ctrl-C or SIGTERM."""


# Set by a command run with --json: a failure is then also one JSON object on
# stdout, so a script reading stdout always gets an answer it can parse.
_json_errors = False


def fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.echo(f"peer: error: {message}", err=True)
    if _json_errors:
        typer.echo(json.dumps({"error": message, "code": code}))
    raise typer.Exit(code)


def json_errors(enabled: bool) -> None:
    """With ``enabled``, failures are also printed as ``{"error": ..., "code": N}``."""
    global _json_errors
    _json_errors = enabled


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="peer: %(message)s",
        stream=sys.stderr,
    )


def check_port(port: int, option: str = "--port") -> int:
    """A listening port: 1-65535, or 0 for any free port."""
    if not 0 <= port <= 65535:
        raise PeerError(f"{option} {port} is not a port: use 1-65535, or 0 for any free port")
    return port


def where(host: str, port: int) -> str:
    """How to say where a node listens."""
    from peerd.transport import is_wildcard

    if is_wildcard(host):
        return f"port {port} on every interface"
    return format_address(host, port)


def parse_tracker(text: str | None) -> tuple[str, int]:
    """The first tracker to try (see :func:`parse_trackers`)."""
    return parse_trackers(text)[0]


def parse_trackers(text: str | None) -> tuple[tuple[str, int], ...]:
    """``--tracker A,B,C``, else $PEER_TRACKER, else config.toml, else the
    default: the trackers, in the order to try them."""
    from peerd.app.link import MAX_TRACKERS

    given = text or os.environ.get("PEER_TRACKER") or _config.tracker or DEFAULT_TRACKER
    names = [n.strip() for n in given.split(",") if n.strip()]
    if not names or len(names) > MAX_TRACKERS:
        raise PeerError(f"--tracker {given}: give 1 to {MAX_TRACKERS} HOST:PORT, comma-separated")
    return tuple(parse_address(n, "tracker") for n in names)


def parse_chunk_size(text: str | None) -> int | None:
    from peerd.content.manifest import valid_chunk_size

    if text is None:
        return None
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise PeerError(f"--chunk-size: {exc}") from None
    if not valid_chunk_size(size):
        raise PeerError(f"--chunk-size {text}: use a power of two from 16KiB to 64MiB")
    return size


def parse_limit(text: str | None, option: str) -> int | None:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise PeerError(f"{option}: {exc}") from None


def parse_budget(text: str | None, option: str, default: int) -> int:
    """A size such as ``1GiB`` for a budget option; ``default`` if not given."""
    if text is None:
        return default
    try:
        return parse_size(text)
    except ValueError as exc:
        raise PeerError(f"{option}: {exc}") from None


def run_trio(main: Callable[[], Awaitable[Any]], *, interrupt_ok: bool = False) -> Any:
    """Run ``main`` under Trio; SIGINT/SIGTERM cancel it cleanly.

    With ``interrupt_ok`` a signal is a normal way to stop (seeding); otherwise
    it is an error (exit 130).
    """
    import trio

    interrupted = False

    async def wrapper() -> Any:
        nonlocal interrupted
        result = None
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                nonlocal interrupted
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        interrupted = True
                        nursery.cancel_scope.cancel()
                        return

            async def body() -> None:
                nonlocal result
                result = await main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            nursery.start_soon(body)
        return result

    try:
        result = trio.run(wrapper)
    except (PeerError, OSError, BaseExceptionGroup) as exc:
        expected = _expected_error(exc)
        if expected is None:
            raise
        if isinstance(expected, OSError):
            fail(f"{expected.strerror or expected}")
        fail(str(expected))
    if interrupted and not interrupt_ok:
        fail(
            "interrupted; verified chunks are kept: run the same command again to resume",
            EXIT_INTERRUPTED,
        )
    return result


def _expected_error(exc: BaseException) -> PeerError | OSError | None:
    """The first expected failure in ``exc`` (unwrapping nursery exception groups).

    None when anything else is in there: that is a bug and keeps its traceback.
    """
    if isinstance(exc, PeerError | OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_expected_error(e) for e in exc.exceptions]
        if found and all(f is not None for f in found):
            return found[0]
    return None


def _transport(name: str | None):  # type: ignore[no-untyped-def]
    from peerd.transport import get_transport

    return get_transport(name or os.environ.get("PEER_TRANSPORT") or _config.transport)


def _identity() -> Identity:
    return Identity.load_or_create(peer_home())


def make_node(
    tracker: str | None,
    host: str,
    port: int,
    transport: str | None,
    up_limit: str | None,
    down_limit: str | None,
    bind: str | None = None,
    public: tuple[str, int] | None = None,
) -> Node:
    """Parse the options every networked command shares and build the node.

    Raises:
        PeerError: a bad option, an unusable key file or transport.
    """
    from peerd.node.node import Node

    return Node(
        _identity(),
        _transport(transport),
        host=host,
        port=check_port(port),
        bind=bind,
        public=public,
        trackers=parse_trackers(tracker),
        up_limit=parse_limit(up_limit, "--up-limit"),
        down_limit=parse_limit(down_limit, "--down-limit"),
    )


# --- commands ---------------------------------------------------------------------
@app.command("id")
def cmd_id() -> None:
    """Print this user's public key (created on first use)."""
    try:
        identity = _identity()
    except PeerError as exc:
        fail(str(exc))
    typer.echo(identity.public_hex)


@app.command("share")
def cmd_share(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The file or directory to share.")],
    tracker: TrackerOpt = None,
    host: HostOpt = ANY_HOST,
    port: PortOpt = 0,
    bind: BindOpt = None,
    transport: TransportOpt = None,
    hash_algo: Annotated[
        str, typer.Option("--hash", metavar="ALGO", help="blake3 (default) or sha256.")
    ] = "blake3",
    chunk_size: Annotated[
        str | None,
        typer.Option(
            "--chunk-size",
            metavar="SIZE",
            help="A power of two from 16KiB to 64MiB (default 1MiB, more for huge files).",
        ),
    ] = None,
    up_limit: UpOpt = None,
    down_limit: DownOpt = None,
    id_only: Annotated[
        bool, typer.Option("--id-only", metavar="", help="Print the bare content id, not a link.")
    ] = False,
    public_addr: Annotated[
        str | None,
        typer.Option(
            "--public-addr",
            metavar="HOST:PORT",
            help="HOST:PORT where others reach this node: written into the link, and "
            "told to the tracker (which believes it from loopback or a private network).",
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Share a file or a directory: print a link (first line of stdout), then seed until Ctrl-C."""
    import trio

    setup_logging(verbose)
    from peerd.app.share import share_file
    from peerd.transport import is_wildcard

    embedded = tracker is None and not os.environ.get("PEER_TRACKER") and not _config.tracker
    try:
        chunk = parse_chunk_size(chunk_size)
        public = parse_address(public_addr, "--public-addr") if public_addr else None
        tracker_address = parse_tracker(tracker)
        handed = _share_via_daemon(ctx, path, hash_algo, chunk, tracker_address)
        if handed is not None:  # a daemon has its own tracker: the link names it
            cid_hex, daemon_tracker = handed
            link = Link(bytes.fromhex(cid_hex), _identity().public_key, (daemon_tracker,))
            typer.echo(cid_hex if id_only else str(link))
            typer.echo(f"shared by the running daemon; get it with: peer get {link}", err=True)
            return
        node = make_node(tracker, host, port, transport, up_limit, down_limit, bind, public)
    except PeerError as exc:
        fail(str(exc))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            trackers = node.trackers
            if embedded:
                # No tracker configured: this node runs one for what it shares,
                # and the link names it (at the address others reach us by).
                reach = public[0] if public else (host if not is_wildcard(host) else _my_address())
                trackers = ((reach, await _embedded_tracker(nursery, host, transport)),)
                node.tracker_address = trackers[0]
            await nursery.start(node.run)
            content = await share_file(node, node.identity, path, algo=hash_algo, chunk_size=chunk)
            cid = content.content_id.hex()
            if public is not None:
                direct: tuple[tuple[str, int], ...] = (public,)
            elif not is_wildcard(node.host):
                direct = ((node.host, node.port),)
            elif embedded:
                direct = ((trackers[0][0], node.port),)
            else:
                direct = ()  # which of our addresses a getter reaches: the tracker knows
            link = Link(content.content_id, node.identity.public_key, trackers, direct)
            print(cid if id_only else link, flush=True)
            print(
                f"seeding {path.name} on {where(node.host, node.port)}; "
                f"get it with: peer get {link}",
                file=sys.stderr,
                flush=True,
            )
            await content.ended.wait()
            raise PeerError(node.failed.get(content.content_id, "stopped sharing"))

    run_trio(main, interrupt_ok=True)


@app.command("get")
def cmd_get(
    ctx: typer.Context,
    content_id: Annotated[
        str,
        typer.Argument(
            metavar="LINK|ID",
            help="A link from `peer share`, a content id, or a unique prefix of 16+ hex characters.",
        ),
    ],
    output_text: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Output file, or a directory (existing, or ending in /) to put it in; "
            "- writes to stdout as chunks verify.",
        ),
    ] = None,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            metavar="",
            help="Fetch in order (with a read-ahead window), to play early.",
        ),
    ] = False,
    trust: TrustOpt = None,
    force: Annotated[
        bool, typer.Option("--force", metavar="", help="Overwrite an existing output file.")
    ] = False,
    seed: Annotated[
        bool, typer.Option("--seed", metavar="", help="Keep seeding after the download completes.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", metavar="", help="Print one JSON summary line.")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", metavar="SECONDS", help="Give up after this many seconds without progress."
        ),
    ] = 60.0,
    peer: Annotated[
        list[str] | None,
        typer.Option(
            "--peer",
            metavar="HOST:PORT",
            help="HOST:PORT of a peer to use too (repeatable); it also serves the manifest "
            "when the tracker cannot.",
        ),
    ] = None,
    tracker: TrackerOpt = None,
    host: HostOpt = ANY_HOST,
    port: PortOpt = 0,
    bind: BindOpt = None,
    transport: TransportOpt = None,
    up_limit: UpOpt = None,
    down_limit: DownOpt = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            metavar="",
            help="Hand the download to the running daemon and return at once.",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Download a file or a directory tree from every useful peer at once, verifying every chunk.

    With a daemon running (`peer daemon`), the daemon downloads it (and seeds
    it afterwards) and this command shows its progress; Ctrl-C asks whether
    to leave it running there.
    """
    import trio

    setup_logging(verbose)
    json_errors(as_json and output_text != "-")  # with -o -, stdout is the content
    import mmap

    from peerd.app.download import OutputClosed, Piece, download
    from peerd.app.progress import ProgressView
    from peerd.content.store import ChunkStore
    from peerd.errors import StorageError

    try:
        content_id, trust_key, tracker, direct = _where_to_look(content_id, trust, peer, tracker)
    except PeerError as exc:
        fail(str(exc))
    if not timeout > 0:
        fail(f"--timeout {timeout:g} is not a positive number of seconds")
    if output_text is None and _config.download_dir is not None:
        output_text = os.path.join(_config.download_dir, "")  # a directory: the file goes in
    output = Path(output_text) if output_text else None
    if output_text and output_text != "-" and output_text.endswith(os.sep):
        try:
            output.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        except OSError as exc:
            fail(f"cannot create the directory {output_text}: {exc.strerror}")
    if output_text != "-":  # stdout is this process's: never the daemon's
        try:
            handed = _get_via_daemon(
                ctx,
                content_id,
                trust_key,
                tracker,
                direct,
                output,
                force=force,
                sequential=sequential,
                detach=detach,
                as_json=as_json,
                timeout=timeout,
            )
        except PeerError as exc:
            fail(str(exc), getattr(exc, "code", EXIT_ERROR))
        if handed:
            return
    if detach:
        fail(
            f"--detach hands the download to a running daemon, and none runs for {peer_home()}: "
            "start one with `peer daemon --detach`"
        )
    try:
        node = make_node(tracker, host, port, transport, up_limit, down_limit, bind)
    except PeerError as exc:
        fail(str(exc))
    show_progress = not as_json and sys.stderr.isatty()
    to_stdout = output_text == "-"
    if to_stdout:
        if seed:
            fail("--seed needs a file to seed from: use -o PATH, not -o -")
        # Verified chunks are kept under $PEER_HOME (a run cut short resumes
        # there) and written to stdout in order; the copy goes at the end.
        output = peer_home() / "streams"
        output.mkdir(parents=True, exist_ok=True)
        _widen_pipe(1)

    buffer: list[mmap.mmap] = []  # one chunk's worth, page-aligned, reused

    def copy_out(store: ChunkStore, pieces: list[Piece]) -> None:
        """Verified ranges of the part file to stdout, in order, in one
        ``writev``: from memory where the node held them, else read back (each
        run of neighbours in one read) into a reused buffer, with ``O_DIRECT``:
        no page cache either way."""
        need = sum(length for _offset, length, held in pieces if held is None)
        if need and (not buffer or len(buffer[0]) < need):
            buffer[:] = [mmap.mmap(-1, need)]
        spare = memoryview(buffer[0]) if need else memoryview(b"")
        views: list[memoryview] = []
        k = 0
        while k < len(pieces):
            offset, length, held = pieces[k]
            k += 1
            if held is not None:
                views.append(memoryview(held)[:length])
                continue
            while k < len(pieces) and pieces[k][2] is None:  # its neighbours on disk
                length += pieces[k][1]
                k += 1
            view = store.read_into_sync(offset, spare[:length])
            if len(view) != length:
                raise StorageError(f"{store.part_path} is shorter than its verified chunks")
            views.append(view)
            spare = spare[length:]
        while views:
            n = os.writev(1, views)
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if views:
                views[0] = views[0][n:]

    async def write_stdout(store: ChunkStore, pieces: list[Piece]) -> None:
        # One thread trip per run of chunks, abandoned if the command is cancelled.
        await trio.to_thread.run_sync(copy_out, store, pieces, abandon_on_cancel=True)

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            view = ProgressView(enabled=show_progress)
            with view:
                try:
                    _content, result = await download(
                        node,
                        content_id,
                        output,
                        trust=trust_key,
                        force=force or to_stdout,
                        stall_timeout=timeout,
                        on_start=lambda c: view.track(nursery, c),
                        peers=direct,
                        sequential=sequential,
                        write=write_stdout if to_stdout else None,
                    )
                except OutputClosed as exc:
                    print(f"peer: {exc}", file=sys.stderr)
                    nursery.cancel_scope.cancel()
                    return None
            if to_stdout:
                _end_stdout()  # the reader sees the end now, not after the cleanup
                await trio.to_thread.run_sync(partial(Path(result.path).unlink, missing_ok=True))
                result = replace(result, path="-")
            if as_json:  # stdout carries the content itself with -o -
                print(json.dumps(asdict(result)), file=sys.stderr if to_stdout else sys.stdout)
            else:
                print(
                    f"{result.path}: {result.bytes} bytes verified in {result.seconds:.2f} s "
                    f"({result.MBps} MB/s) from {result.peers_used} peer(s)",
                    file=sys.stderr,
                )
            if seed:
                print("seeding; Ctrl-C to stop", file=sys.stderr, flush=True)
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()
        return result

    run_trio(main, interrupt_ok=seed)


def _get_via_daemon(
    ctx: typer.Context,
    content_id: str,
    trust: bytes | None,
    tracker: str | None,
    peers: list[tuple[str, int]],
    output: Path | None,
    *,
    force: bool,
    sequential: bool,
    detach: bool,
    as_json: bool,
    timeout: float,
) -> bool:
    """Hand a get to a running daemon and follow it; False when no daemon runs.

    Raises:
        PeerError: a refused flag, the daemon's refusal, the download's failure
            (a :class:`cli.remote.Failure` carries its exit code).
    """
    from cli.remote import daemon_status, follow_download, given, refuse_daemon_flags
    from peerd.app.control import control_request

    home = peer_home()
    daemon = daemon_status(home)
    if daemon is None:
        return False
    flag = ctx.params.get("tracker")
    refuse_daemon_flags(ctx, daemon, parse_tracker(flag) if flag else None)
    ours = daemon.get("daemon", {}).get("tracker")
    if tracker and not given(ctx, "tracker") and ours:
        named = format_address(*parse_address(tracker, "tracker"))
        if named != ours:
            typer.echo(
                f"peer: note: the link names tracker {named}; the daemon asks its own, {ours}"
                + (" (and the link's peers)" if peers else ""),
                err=True,
            )
    request: dict[str, Any] = {
        "cmd": "get",
        "id": content_id,
        "output": str((output or Path.cwd()).absolute()),
        "force": force,
        "sequential": sequential,
        "peers": [[host, port] for host, port in peers],
    }
    if trust is not None:
        request["trust"] = trust.hex()
    reply = control_request(home, request)
    if reply is None:
        raise PeerError("the daemon stopped before it took the download; run the command again")
    cid, path = str(reply["id"]), str(reply["path"])
    if detach:
        if as_json:
            print(json.dumps({"id": cid, "path": path, "detached": True}), flush=True)
        typer.echo(
            f"the daemon downloads {path}; `peer status {cid[:16]}` follows it, "
            f"`peer rm {cid[:16]}` cancels it",
            err=True,
        )
        return True
    show = not as_json and sys.stderr.isatty()
    result = follow_download(home, cid, show=show, stall_timeout=timeout)
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        seconds = float(result.get("seconds") or 0)
        typer.echo(
            f"{result['path']}: {result['bytes']} bytes verified in {seconds:.2f} s"
            + (f" ({result['MBps']} MB/s)" if "MBps" in result else "")
            + (f" from {result['peers_used']} peer(s)" if "peers_used" in result else "")
            + "; the daemon seeds it",
            err=True,
        )
    return True


def _share_via_daemon(
    ctx: typer.Context, path: Path, algo: str, chunk: int | None, tracker: tuple[str, int]
) -> tuple[str, tuple[str, int]] | None:
    """Hand a share to a running daemon: (content id, the daemon's tracker),
    or None when no daemon runs. Flags the daemon's node decides are refused."""
    from cli.remote import daemon_status, refuse_daemon_flags
    from peerd.app.daemon import try_daemon_share

    daemon = daemon_status(peer_home())
    if daemon is None:
        return None
    refuse_daemon_flags(ctx, daemon, tracker)
    handed = try_daemon_share(peer_home(), path, algo, chunk)
    if handed is None:
        return None  # it stopped meanwhile: share alone
    ours = daemon.get("daemon", {}).get("tracker")
    return handed, parse_address(ours, "tracker") if ours else tracker


async def _embedded_tracker(nursery: trio.Nursery, host: str, transport: str | None) -> int:
    """Start a tracker in this process (data under $PEER_HOME/tracker); its port."""
    from tracker.server import serve_tracker

    data = peer_home() / "tracker"
    return int(await nursery.start(partial(serve_tracker, host, 0, data, _transport(transport))))


def _my_address() -> str:
    """The address this machine uses to reach others (the route's source
    address; no packet is sent), else loopback with a warning."""
    import socket

    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))  # UDP connect: picks a route, sends nothing
                address = str(probe.getsockname()[0])
            if address not in ("0.0.0.0", "::"):
                return address
        except OSError:
            continue
    typer.echo(
        "peer: no network address found; the link works on this machine only "
        "(--public-addr HOST:PORT names one)",
        err=True,
    )
    return "127.0.0.1"


def _end_stdout() -> None:
    """Close our end of stdout (a reader of ``-o -`` gets end of file at once)
    and leave ``/dev/null`` in its place, so no later open can become fd 1."""
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
    finally:
        os.close(null)


def _widen_pipe(fd: int) -> None:
    """If ``fd`` is a pipe, ask for a 1 MiB buffer (best effort): a chunk then
    crosses in one write, not sixteen 64 KiB ones each waiting for the reader."""
    import fcntl
    import stat

    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size for an unprivileged user: the default stays


def _where_to_look(
    content_id: str, trust: str | None, peer: list[str] | None, tracker: str | None
) -> tuple[str, bytes | None, str | None, list[tuple[str, int]]]:
    """The id, trusted key, tracker and peers from get/stream/info's options and link."""
    trust_key = parse_public_key(trust) if trust else None
    direct = [parse_address(text, "--peer") for text in peer or ()]
    return _apply_link(content_id, trust_key, tracker, direct)


def _apply_link(
    text: str, trust: bytes | None, tracker: str | None, peers: list[tuple[str, int]]
) -> tuple[str, bytes | None, str | None, list[tuple[str, int]]]:
    """What a link adds to get's options: its id, key (as --trust), first
    tracker (unless --tracker is given) and peers (besides --peer)."""
    if not is_link(text):
        return text, trust, tracker, peers
    link = parse_link(text)
    if link.key is not None and trust is not None and trust != link.key:
        raise PeerError("--trust names another key than the link's publisher key (pk=)")
    if tracker is None and link.trackers:
        tracker = ",".join(format_address(*t) for t in link.trackers)
    extra = [a for a in link.peers if a not in peers]
    return link.content_id.hex(), link.key or trust, tracker, [*peers, *extra]


@app.command("stream")
def cmd_stream(
    content_id: Annotated[
        str, typer.Argument(metavar="LINK|ID", help="A link, a content id, or a 16+ hex prefix.")
    ],
    http_port: Annotated[
        int,
        typer.Option(
            "--http-port", metavar="PORT", help="Port of the HTTP server; 0 = any free port."
        ),
    ] = 0,
    http_host: Annotated[
        str, typer.Option("--http-host", metavar="ADDR", help="Address of the HTTP server.")
    ] = "127.0.0.1",
    trust: TrustOpt = None,
    peer: Annotated[
        list[str] | None,
        typer.Option(
            "--peer", metavar="HOST:PORT", help="HOST:PORT of a peer to use too (repeatable)."
        ),
    ] = None,
    tracker: TrackerOpt = None,
    host: HostOpt = ANY_HOST,
    port: PortOpt = 0,
    bind: BindOpt = None,
    transport: TransportOpt = None,
    up_limit: UpOpt = None,
    down_limit: DownOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve a content over HTTP (with Range: players can seek) while it downloads."""
    import trio

    setup_logging(verbose)
    from peerd.app.download import close_store, obtain_manifest, resolve_id, tree_not_streamable
    from peerd.app.http_stream import HttpStreamer
    from peerd.content.store import ChunkStore

    try:
        check_port(http_port, "--http-port")
        content_id, trust_key, tracker, direct = _where_to_look(content_id, trust, peer, tracker)
        node = make_node(tracker, host, port, transport, up_limit, down_limit, bind)
    except PeerError as exc:
        fail(str(exc))
    cache = peer_home() / "streams"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            cid = await resolve_id(node, content_id)
            manifest = await obtain_manifest(node, cid, trust_key, direct)
            if manifest.info.is_tree:
                raise PeerError(tree_not_streamable(manifest.info))
            await trio.to_thread.run_sync(partial(cache.mkdir, parents=True, exist_ok=True))
            path = cache / f"{cid.hex()[:16]}-{manifest.info.name}"
            # Read back as it fills: a stream's cache (page cache, no fsync).
            store = await ChunkStore.open(manifest.info, cid, path, force=True, cache=True)
            content = None
            try:
                content = await node.add_content(manifest, store)
                for ip, peer_port in direct:
                    content.dial(ip, peer_port)
                streamer = HttpStreamer(content, store)
                listener = await nursery.start(
                    node.transport.serve, http_host, http_port, streamer.handle
                )
                url = f"http://{format_address(http_host, listener.port)}/"
                print(url, flush=True)
                print(
                    f"serving {manifest.info.name} at {url} while it downloads; Ctrl-C to stop",
                    file=sys.stderr,
                    flush=True,
                )
                await content.ended.wait()
                raise PeerError(node.failed.get(cid, "the download stopped"))
            finally:
                with trio.CancelScope(shield=True):
                    await close_store(node, content, store)

    run_trio(main, interrupt_ok=True)


@app.command("info")
def cmd_info(
    content_id: Annotated[
        str, typer.Argument(metavar="LINK|ID", help="A link, a content id, or a 16+ hex prefix.")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", metavar="", help="Print one JSON object.")
    ] = False,
    trust: TrustOpt = None,
    peer: Annotated[
        list[str] | None,
        typer.Option(
            "--peer",
            metavar="HOST:PORT",
            help="HOST:PORT of a peer to ask for the manifest (repeatable).",
        ),
    ] = None,
    tracker: TrackerOpt = None,
    transport: TransportOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Say what a getter would get (name, size, chunks, hash, signer) without downloading."""
    import trio

    setup_logging(verbose)
    json_errors(as_json)
    from peerd.app.download import obtain_manifest, resolve_id

    try:
        content_id, trust_key, tracker, direct = _where_to_look(content_id, trust, peer, tracker)
        node = make_node(tracker, "127.0.0.1", 0, transport, None, None)
    except PeerError as exc:
        fail(str(exc))

    async def main() -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            cid = await resolve_id(node, content_id)
            manifest = await obtain_manifest(node, cid, trust_key, direct, publish=False)
            nursery.cancel_scope.cancel()
        info = manifest.info
        files = info.files if info.files is not None else ((info.name, info.size),)
        return {
            "id": cid.hex(),
            "name": info.name,
            "size": info.size,
            "tree": info.is_tree,
            "files": [{"path": path, "size": size} for path, size in files],
            "dirs": list(info.dirs),
            "chunk_size": info.chunk_size,
            "chunks": info.num_chunks,
            "hash": info.algo,
            "signers": [key.hex() for key, _sig in manifest.signatures],
        }

    facts = run_trio(main)
    if as_json:
        print(json.dumps(facts), flush=True)
        return
    for label, key in (("id", "id"), ("name", "name"), ("size", "size")):
        print(f"{label + ':':<12}{facts[key]}")
    if facts["tree"]:
        n_dirs = len(facts["dirs"])
        empty = f", {n_dirs} empty director{'y' if n_dirs == 1 else 'ies'}" if n_dirs else ""
        print(
            f"{'files:':<12}{len(facts['files'])} ({facts['size']} bytes){empty}; --json lists them"
        )
    print(f"{'chunks:':<12}{facts['chunks']} x {facts['chunk_size']} bytes ({facts['hash']})")
    for signer in facts["signers"]:
        print(f"{'signed by:':<12}{signer}")


@app.command("tracker")
def cmd_tracker(
    host: HostOpt = ANY_HOST,
    port: Annotated[
        int,
        typer.Option(
            "--port", metavar="PORT", help="Port to listen on, 1-65535; 0 = any free port."
        ),
    ] = 7070,
    transport: TransportOpt = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", metavar="DIR", help="Directory for the manifest database."),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            metavar="SIZE",
            help="Memory budget for what clients make the tracker hold, e.g. 1GiB "
            "(default 1GiB, at least 64MiB).",
        ),
    ] = None,
    max_disk: Annotated[
        str | None,
        typer.Option(
            "--max-disk",
            metavar="SIZE",
            help="Disk budget for published manifests, e.g. 4GiB (default 4GiB, at least 1MiB).",
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="memory (default), or redis://[:PASSWORD@]HOST:PORT/DB: share state with "
            "every tracker on that Redis (default $PEER_REDIS_URL). rediss:// for TLS "
            "(?ssl_ca_certs=PATH for a private CA); redis+cluster://HOST:PORT (or "
            "rediss+cluster://) for a Redis Cluster, through any of its nodes.",
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a tracker in the foreground."""
    from tracker.server import TrackerLimits, run_tracker

    defaults = TrackerLimits()
    try:
        check_port(port)
        memory = parse_budget(max_memory, "--max-memory", defaults.max_memory)
        disk = parse_budget(max_disk, "--max-disk", defaults.max_disk)
        limits = TrackerLimits(max_memory=memory, max_disk=disk)
        store = _tracker_store(store)
    except PeerError as exc:
        fail(str(exc))
    except ValueError as exc:  # under a minimum: name the option, not the field
        fail(str(exc).replace("max_memory", "--max-memory").replace("max_disk", "--max-disk"))
    # Timestamped: counts of publishes and announces each minute; with -v,
    # every one of them (DEBUG).
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # the Redis client's own retries: the tracker says what matters
        logging.getLogger("coredis").setLevel(logging.WARNING)
    raise typer.Exit(run_tracker(host, port, transport, data, limits, store))


def _tracker_store(text: str | None) -> str:
    """``--store`` (else $PEER_REDIS_URL) checked; ``memory`` when neither is given."""
    from tracker.store import store_url

    return store_url(text) or "memory"


@app.command("daemon")
def cmd_daemon(
    tracker: TrackerOpt = None,
    host: HostOpt = ANY_HOST,
    port: PortOpt = 0,
    bind: BindOpt = None,
    transport: TransportOpt = None,
    up_limit: UpOpt = None,
    down_limit: DownOpt = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            metavar="",
            help="Run in the background (log in $PEER_HOME/daemon.log); return once it serves.",
        ),
    ] = False,
    log_file: Annotated[Path | None, typer.Option("--log-file", hidden=True)] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a long-lived node for this $PEER_HOME: share and get go to it while it runs.

    Control it with status, ls, rm, pause, resume, limit and stop. It ignores
    SIGHUP (closing the terminal does not end it); SIGTERM or `peer stop` do.
    """
    from peerd.app.daemon import run_daemon

    home = peer_home()
    try:  # checked here too with --detach: a bad option is said on this terminal
        node = make_node(tracker, host, port, transport, up_limit, down_limit, bind)
    except PeerError as exc:
        fail(str(exc))
    if detach:
        raise typer.Exit(_detach_daemon(home, verbose))
    if log_file is not None:
        _log_to_file(log_file, verbose)
    else:
        setup_logging(verbose)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def started() -> None:
        message = (
            f"daemon for {home} started (pid {os.getpid()}): listening on "
            f"{where(node.host, node.port)}, tracker {format_address(*node.tracker_address)}"
        )
        logging.getLogger("peerd.app.daemon").info("%s", message)
        if log_file is None:
            print(message, file=sys.stderr, flush=True)

    async def main() -> None:
        await run_daemon(home, node, node.identity, started=started)

    run_trio(main, interrupt_ok=True)


LOG_MAX_BYTES = 4 << 20  # daemon.log is rotated at this size ...
LOG_BACKUPS = 3  # ... keeping daemon.log.1 to .3


def _log_to_file(path: Path, verbose: bool) -> None:
    """The detached daemon's log: timestamped lines, rotated by size."""
    from logging.handlers import RotatingFileHandler

    try:
        handler = RotatingFileHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
    except OSError as exc:
        fail(f"cannot open the log {path}: {exc.strerror}")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


DETACH_WAIT = 30.0  # seconds a detached daemon has to answer on its socket


def _detach_daemon(home: Path, verbose: bool) -> int:
    """Start this same command again in a new session (no terminal: SIGHUP
    cannot reach it), logging to ``$PEER_HOME/daemon.log``; return 0 once it
    answers on its control socket, else 1 with its own error."""
    import subprocess
    import time

    from cli.remote import daemon_status

    try:
        running = daemon_status(home)
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (PeerError, OSError) as exc:
        fail(str(exc))
    if running is not None:
        fail(
            f"a daemon is already running (pid {running['daemon']['pid']}) for {home}; "
            "stop it with `peer stop`"
        )
    home = home.absolute()  # the child runs in it: a relative PEER_HOME would move
    log_path = home / "daemon.log"
    argv = [a for a in sys.argv[1:] if a != "--detach"]
    with open(log_path, "ab") as log_out:
        start = log_out.tell()
        child = subprocess.Popen(
            [sys.executable, "-m", "cli", *argv, "--log-file", str(log_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_out,
            stderr=log_out,
            start_new_session=True,
            close_fds=True,
            cwd=home,  # its own directory, not wherever it was started (a mount it would pin)
            env=dict(os.environ, PEER_HOME=str(home)),
        )
    deadline = time.monotonic() + DETACH_WAIT
    while True:
        if child.poll() is not None:
            with open(log_path, "rb") as f:
                f.seek(start)
                said = f.read().decode("utf-8", "replace").strip().splitlines()
            errors = [line for line in said if line.startswith("peer: error:")]
            typer.echo(
                errors[-1] if errors else f"peer: error: the daemon exited; see {log_path}",
                err=True,
            )
            return EXIT_ERROR
        try:
            status = daemon_status(home)
        except PeerError:
            status = None
        if status is not None and status["daemon"]["pid"] == child.pid:
            info = status["daemon"]
            typer.echo(
                f"daemon for {home} started (pid {child.pid}): listening on port {info['port']}, "
                f"tracker {info['tracker']}; log in {log_path}",
                err=True,
            )
            return 0
        if time.monotonic() > deadline:
            typer.echo(
                f"peer: error: the daemon did not answer in {DETACH_WAIT:.0f} s; see {log_path}",
                err=True,
            )
            return EXIT_ERROR
        time.sleep(0.05)


def _control(request: dict[str, Any]) -> dict[str, Any]:
    from peerd.app.control import control_request

    try:
        reply = control_request(peer_home(), request)
    except PeerError as exc:
        fail(str(exc))
    if reply is None:
        fail(f"no daemon runs for {peer_home()}; start one with `peer daemon --detach`")
    assert reply is not None
    return reply


IdArg = Annotated[
    str,
    typer.Argument(metavar="ID", help="A content id in the daemon, or a unique prefix (4+ hex)."),
]


@app.command("status")
def cmd_status(
    content_id: Annotated[
        str | None,
        typer.Argument(metavar="[ID]", help="One content: adds its connected peers."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON.")] = False,
) -> None:
    """Show the daemon's transfers: state, progress, rates, ETA, peers."""
    json_errors(as_json)
    request: dict[str, Any] = {"cmd": "status"}
    if content_id is not None:
        request["id"] = content_id
    reply = _control(request)
    if as_json:
        print(json.dumps(reply))
        return
    from rich.console import Console

    # On a terminal, its width; into a pipe or a file, wide enough for a row
    # to stay on one line (a script reads it).
    console = Console(width=None if sys.stdout.isatty() else 240)
    console.print(status_table(reply))
    if "peers" in reply:
        console.print(peer_table(reply["peers"]))
    shown = {t.get("id") for t in reply.get("transfers", [])}
    for cid, err in reply.get("errors", {}).items():
        if cid not in shown:
            typer.echo(f"{cid[:16]}: {err}", err=True)
    if reply.get("state_error"):
        typer.echo(f"warning: {reply['state_error']}", err=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def status_table(reply: dict[str, Any]) -> Any:
    """The ``peer status`` table. Every cell is plain text: a remote manifest's
    name (or an error quoting one) is never read as rich markup."""
    from rich.table import Table
    from rich.text import Text

    info = reply.get("daemon")
    title = "transfers"
    if info:
        limits = "  ".join(
            f"{k} limit {_mb(v)}/s"
            for k, v in (("up", info.get("up")), ("down", info.get("down")))
            if v
        )
        title = (
            f"transfers (daemon pid {info['pid']}, port {info['port']}, tracker {info['tracker']}"
        )
        title += f"; {limits})" if limits else ")"
    table = Table(title=title)
    columns = (
        "id",
        "name",
        "size",
        "state",
        "progress",
        "down MB/s",
        "up MB/s",
        "ETA",
        "uploaded",
        "peers",
    )
    for col in columns:
        # The id is what `peer get` and friends take: never cut below 16 hex.
        table.add_column(col, min_width=16 if col == "id" else None, no_wrap=col == "id")
    for t in reply.get("transfers", []):
        pct = 100.0 * t["have"] / t["size"] if t["size"] else 100.0
        eta = t.get("eta_s")
        table.add_row(
            Text(str(t["id"])[:16]),
            Text(str(t["name"])),
            _mb(t["size"]),
            Text(str(t["state"])),
            f"{pct:.1f}%",
            str(t["down_MBps"]),
            str(t.get("up_MBps", 0.0)),
            "-" if eta is None else f"{eta // 60}:{eta % 60:02d}",
            _mb(t["uploaded"]),
            str(t["peers"]),
        )
    return table


def peer_table(peers: list[dict[str, Any]]) -> Any:
    """The peers of one content (``peer status ID``)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="peers")
    for col in ("address", "key", "sent", "received", "down MB/s", "up MB/s"):
        table.add_column(col, no_wrap=col in ("address", "key"))
    for p in peers:
        table.add_row(
            Text(str(p["address"])),
            str(p["key"])[:16],
            _mb(p["sent"]),
            _mb(p["received"]),
            str(p["down_MBps"]),
            str(p["up_MBps"]),
        )
    return table


@app.command("ls")
def cmd_ls(
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON.")] = False,
) -> None:
    """List what the daemon shares: id, size, state, path."""
    json_errors(as_json)
    reply = _control({"cmd": "ls"})
    if as_json:
        print(json.dumps(reply["shared"]))
        return
    for entry in reply.get("shared", []):
        state = "" if entry["state"] == "seeding" else f"  [{entry['state']}]"
        typer.echo(f"{entry['id']}  {_mb(entry['size']):>10}  {entry['path']}{state}")


@app.command("rm")
def cmd_rm(
    content_id: IdArg,
    delete: Annotated[
        bool,
        typer.Option(
            "--delete",
            metavar="",
            help="Also delete the downloaded file or its .part (never a file you shared).",
        ),
    ] = False,
) -> None:
    """Stop sharing a content, or cancel its download, in the daemon."""
    reply = _control({"cmd": "rm", "id": content_id, "delete": delete})
    for path in reply.get("deleted", []):
        typer.echo(f"deleted {path}", err=True)
    if reply.get("kept"):
        typer.echo(f"kept: {reply['kept']}", err=True)
    typer.echo(f"removed {reply['id'][:16]} from the daemon", err=True)


@app.command("pause")
def cmd_pause(content_id: IdArg) -> None:
    """Pause a download or a share in the daemon (verified chunks are kept)."""
    reply = _control({"cmd": "pause", "id": content_id})
    typer.echo(f"paused {reply['id'][:16]}; `peer resume {reply['id'][:16]}` goes on", err=True)


@app.command("resume")
def cmd_resume(content_id: IdArg) -> None:
    """Resume a paused (or failed) download or share in the daemon."""
    reply = _control({"cmd": "resume", "id": content_id})
    typer.echo(f"resumed {reply['id'][:16]}", err=True)


@app.command("limit")
def cmd_limit(
    up: Annotated[
        str | None,
        typer.Option("--up", metavar="RATE", help="Upload limit per second; 0 = unlimited."),
    ] = None,
    down: Annotated[
        str | None,
        typer.Option("--down", metavar="RATE", help="Download limit per second; 0 = unlimited."),
    ] = None,
) -> None:
    """Set the daemon's upload and download limits now (no option: show them)."""
    request: dict[str, Any] = {"cmd": "limit"}
    try:
        if up is not None:
            request["up"] = parse_limit(up, "--up")
        if down is not None:
            request["down"] = parse_limit(down, "--down")
    except PeerError as exc:
        fail(str(exc))
    reply = _control(request)
    for key in ("up", "down"):
        rate = reply.get(key)
        typer.echo(f"{key}: {'unlimited' if rate is None else f'{rate} bytes/s'}")


@app.command("stop")
def cmd_stop() -> None:
    """Stop the daemon (it announces the stop and closes everything); returns once it has exited."""
    import time

    pid = int(_control({"cmd": "status"})["daemon"]["pid"])
    _control({"cmd": "stop"})
    # Its lock goes when it is done; its process a moment later: wait for both.
    deadline = time.monotonic() + STOP_WAIT
    while _running(pid):
        if time.monotonic() > deadline:
            fail(f"the daemon (pid {pid}) was asked to stop but still runs after {STOP_WAIT:.0f} s")
        time.sleep(0.02)
    typer.echo("daemon stopped", err=True)


STOP_WAIT = 15.0  # seconds `peer stop` waits for the daemon's process to end


def _running(pid: int) -> bool:
    """Is process ``pid`` alive (not gone, not a zombie waiting to be reaped)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) S ...": the state follows the last ")".
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("peer: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
