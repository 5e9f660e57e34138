#!/usr/bin/env python3
"""The five Linux I/O models of the seed document, measured side by side.

One small request/response server per model, each in its own process: the
client sends a fixed 64-byte request, the server answers a fixed 64-byte
response. Models (rows):

* ``blocking``  a thread per connection, blocking ``recv``/``sendall``
  (thread stacks of 64 KiB via ``threading.stack_size``);
* ``busypoll``  non-blocking sockets, one loop calling ``recv`` on every
  socket until ``EAGAIN`` (never sleeps: it burns a core by design);
* ``select``, ``poll``, ``epoll``  I/O multiplexing, level-triggered, one
  ``recv`` per ready socket; ``select`` cannot watch a descriptor >= 1024
  (FD_SETSIZE), so its C=10,000 cells are skipped;
* ``sigio``  signal-driven I/O: ``F_SETOWN`` + ``O_ASYNC`` on every socket, a
  SIGIO handler that does the reads. Python runs signal handlers in the main
  thread between bytecodes and gives a handler no ``siginfo``, so the handler
  cannot know which descriptor is ready (``F_SETSIG``'s ``si_fd`` never reaches
  Python): it scans every socket. The table reports handler runs per request;
* ``uring``  asynchronous I/O: a minimal io_uring proactor (``liburing``), a
  multishot accept, and per connection one RECV then one SEND in flight;
* ``reactor``, ``proactor``  the product: ``peerd.transport``'s ``serve``
  under Trio, one task per connection (``recv_exactly_into`` + ``send_all``).

Load: C connections of which A % (at least one) are active; each active one
runs closed-loop request/response, the idle ones stay open and silent. The
generator is 1-2 separate processes driving their share of the connections
with ``select.epoll``; its own CPU is reported. Before any measurement every
connection does one request/response, so the server has really accepted and
served each one.

Per cell: requests/s and p99 latency (client side, in a ``--window`` after a
``--warm`` up), server CPU seconds per 100 k requests (``/proc/PID/stat``,
all threads), server memory per connection ((RSS with C connections - RSS
before any connection) / C, from ``/proc/PID/status``).

    python scripts/bench_io_models.py                          # full matrix (~6 min)
    python scripts/bench_io_models.py --quick                  # reduced matrix (~1.5 min)
    python scripts/bench_io_models.py --models epoll,uring --conns 10,1000
    python scripts/bench_io_models.py --write-docs             # also regenerate docs/IO_MODELS.md + PNG

``--write-docs`` needs matplotlib: ``pip install -e '.[bench]'`` (or
``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REQ = 64
RESP = 64
REQUEST = bytes(range(REQ))
RESPONSE = b"0123456789abcdef" * (RESP // 16)
RECV_SIZE = 1024
BACKLOG = 4096
THREAD_STACK = 64 * 1024
FD_SETSIZE = 1024

MODELS = (
    "blocking",
    "busypoll",
    "select",
    "poll",
    "epoll",
    "sigio",
    "uring",
    "reactor",
    "proactor",
)
CONNS = (10, 100, 1000, 10000)
ACTIVE = (1, 10, 100)
QUICK_CONNS = (10, 1000)
QUICK_ACTIVE = (10, 100)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "IO_MODELS.md"
PNG = ROOT / "docs" / "io_models.png"
TABLE_START = "<!-- table: written by scripts/bench_io_models.py -->"
TABLE_END = "<!-- end of table -->"


# --- servers (each runs in its own process: ``--serve MODEL``) ---------------------


def _listen() -> socket.socket:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(BACKLOG)
    return ls


def _announce(port: int) -> None:
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def _complain(what: str) -> None:
    sys.stderr.write(f"bench_io_models server: {what}\n")


def serve_blocking(ls: socket.socket) -> None:
    threading.stack_size(THREAD_STACK)

    def handle(c: socket.socket) -> None:
        pend = 0
        with c:
            while True:
                try:
                    data = c.recv(RECV_SIZE)
                except OSError:
                    return
                if not data:
                    return
                pend += len(data)
                k, pend = divmod(pend, REQ)
                if k:
                    try:
                        c.sendall(RESPONSE * k)
                    except OSError:
                        return

    _announce(ls.getsockname()[1])
    while True:
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(c,), daemon=True).start()


class Conns:
    """Non-blocking connections by fd, with the bytes of a partial request."""

    def __init__(self) -> None:
        self.socks: dict[int, socket.socket] = {}
        self.pend: dict[int, int] = {}

    def add(self, c: socket.socket) -> int:
        c.setblocking(False)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = c.fileno()
        self.socks[fd] = c
        self.pend[fd] = 0
        return fd

    def close(self, fd: int) -> None:
        self.pend.pop(fd, None)
        c = self.socks.pop(fd, None)
        if c is not None:
            c.close()

    def read(self, fd: int, drain: bool) -> bool:
        """``recv`` once (or until EAGAIN when ``drain``) and answer; False: closed."""
        c = self.socks[fd]
        pend = self.pend[fd]
        while True:
            try:
                data = c.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.close(fd)
                return False
            pend += len(data)
            k, pend = divmod(pend, REQ)
            if k:
                out = RESPONSE * k
                try:
                    sent = c.send(out)
                except OSError:
                    sent = -1
                if sent != len(out):
                    # A closed-loop client has one 64-byte answer outstanding at
                    # most: a full send buffer means a misbehaving client.
                    _complain(f"send on fd {fd} would block: closing it")
                    self.close(fd)
                    return False
            if not drain:
                break
        self.pend[fd] = pend
        return True


def _accept_all(ls: socket.socket, conns: Conns, limit: int | None = None) -> list[int]:
    fds: list[int] = []
    while True:
        try:
            c, _ = ls.accept()
        except BlockingIOError:
            return fds
        except OSError as exc:  # EMFILE and the like: keep serving the others
            _complain(f"accept: {exc}")
            return fds
        if limit is not None and c.fileno() >= limit:
            _complain(f"fd {c.fileno()} >= FD_SETSIZE: select cannot watch it, closing")
            c.close()
            continue
        fds.append(conns.add(c))


def serve_busypoll(ls: socket.socket) -> None:
    ls.setblocking(False)
    conns = Conns()
    _announce(ls.getsockname()[1])
    while True:
        _accept_all(ls, conns)
        for fd in list(conns.socks):
            conns.read(fd, drain=True)


def serve_select(ls: socket.socket) -> None:
    ls.setblocking(False)
    conns = Conns()
    lfd = ls.fileno()
    _announce(ls.getsockname()[1])
    while True:
        ready, _, _ = select.select([lfd, *conns.socks], [], [])
        for fd in ready:
            if fd == lfd:
                _accept_all(ls, conns, limit=FD_SETSIZE)
            else:
                conns.read(fd, drain=False)


def serve_poll(ls: socket.socket) -> None:
    ls.setblocking(False)
    conns = Conns()
    lfd = ls.fileno()
    p = select.poll()
    p.register(lfd, select.POLLIN)
    _announce(ls.getsockname()[1])
    while True:
        for fd, _ in p.poll():
            if fd == lfd:
                for new in _accept_all(ls, conns):
                    p.register(new, select.POLLIN)
            elif fd in conns.socks:
                conns.read(fd, drain=False)  # a closed fd leaves the poll set with close()
                if fd not in conns.socks:
                    p.unregister(fd)


def serve_epoll(ls: socket.socket) -> None:
    ls.setblocking(False)
    conns = Conns()
    lfd = ls.fileno()
    ep = select.epoll()
    ep.register(lfd, select.EPOLLIN)
    _announce(ls.getsockname()[1])
    while True:
        for fd, _ in ep.poll(-1, 256):
            if fd == lfd:
                for new in _accept_all(ls, conns):
                    ep.register(new, select.EPOLLIN)
            elif fd in conns.socks:
                conns.read(fd, drain=False)  # close() removes it from the epoll set


def serve_sigio(ls: socket.socket) -> None:
    ls.setblocking(False)
    conns = Conns()
    me = os.getpid()
    # handler runs, sockets scanned, SIGIOs that arrived while the handler ran.
    # Python runs a handler again *inside* itself when a signal comes in
    # between two bytecodes of the first run (every send() raises SIGIO on
    # the socket's output side): without this guard the nesting overflows
    # the stack. A nested call only asks the running one for one more pass.
    runs = [0, 0, 0]  # passes over all sockets, sockets tried, nested handler calls
    busy = [False, False]  # in the handler, another scan wanted

    def arm(fd: int) -> None:
        fcntl.fcntl(fd, fcntl.F_SETOWN, me)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC | os.O_NONBLOCK)

    def on_sigio(signum: int, frame: object) -> None:
        busy[1] = True
        if busy[0]:
            runs[2] += 1
            return
        while True:
            busy[0] = True
            while busy[1]:
                busy[1] = False
                runs[0] += 1
                for fd in _accept_all(ls, conns):
                    arm(fd)  # data that came before O_ASYNC is read by the pass below
                for fd in list(conns.socks):  # SIGIO says "something is ready", not what
                    runs[1] += 1
                    conns.read(fd, drain=True)
            busy[0] = False
            # A SIGIO that came after the last check and before busy[0] went
            # False set busy[1] and left: go round again. One that comes after
            # this check finds busy[0] False and does the pass itself.
            if not busy[1]:
                return

    def on_stats(signum: int, frame: object) -> None:
        sys.stdout.write(f"STATS {runs[0]} {runs[1]} {runs[2]}\n")
        sys.stdout.flush()

    signal.signal(signal.SIGIO, on_sigio)
    signal.signal(signal.SIGUSR1, on_stats)
    arm(ls.fileno())
    _announce(ls.getsockname()[1])
    os.kill(me, signal.SIGIO)  # a connection that came before the arming
    while True:
        signal.pause()


def serve_uring(ls: socket.socket) -> None:
    import liburing as L

    ring = L.Ring()
    cqe = L.Cqe()
    try:
        L.io_uring_queue_init(
            4096, ring, L.IORING_SETUP_SINGLE_ISSUER | L.IORING_SETUP_COOP_TASKRUN
        )
    except OSError:
        ring = L.Ring()
        L.io_uring_queue_init(4096, ring, 0)
    ACCEPT, RECV, SEND = 0, 1, 2
    lfd = ls.fileno()
    socks: dict[int, socket.socket] = {}
    bufs: dict[int, bytearray] = {}
    pend: dict[int, int] = {}
    out: dict[int, bytes] = {}  # the kernel reads it until the SEND completes

    def sqe() -> Any:
        s = L.io_uring_get_sqe(ring)
        if s is None:
            L.io_uring_submit(ring)
            s = L.io_uring_get_sqe(ring)
        return s

    def arm_accept() -> None:
        s = sqe()
        L.io_uring_prep_multishot_accept(s, lfd)
        L.io_uring_sqe_set_data64(s, (lfd << 2) | ACCEPT)

    def arm_recv(fd: int) -> None:
        s = sqe()
        L.io_uring_prep_recv(s, fd, bufs[fd], 0)
        L.io_uring_sqe_set_data64(s, (fd << 2) | RECV)

    def arm_send(fd: int, data: bytes) -> None:
        out[fd] = data
        s = sqe()
        L.io_uring_prep_send(s, fd, data, 0)
        L.io_uring_sqe_set_data64(s, (fd << 2) | SEND)

    def close(fd: int) -> None:
        bufs.pop(fd, None)
        pend.pop(fd, None)
        out.pop(fd, None)
        c = socks.pop(fd, None)
        if c is not None:
            c.close()  # nothing of ours is in flight on it: one op per fd at a time

    arm_accept()
    _announce(ls.getsockname()[1])
    while True:
        L.io_uring_submit_and_wait(ring, 1)
        while True:
            try:
                L.io_uring_peek_cqe(ring, cqe)
            except BlockingIOError:
                break
            entry = cqe[0]
            ud = entry.user_data
            cflags = entry.flags
            try:
                res = entry.res
            except OSError as exc:
                res = -(exc.errno or errno.EIO)
            finally:
                L.io_uring_cqe_seen(ring, entry)
            fd, kind = ud >> 2, ud & 3
            if kind == ACCEPT:
                if res >= 0:
                    c = socket.socket(fileno=res)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    socks[res] = c
                    bufs[res] = bytearray(REQ)
                    pend[res] = 0
                    arm_recv(res)
                else:
                    _complain(f"accept: {os.strerror(-res)}")
                if not cflags & L.IORING_CQE_F_MORE:
                    arm_accept()
            elif kind == RECV:
                if res <= 0:
                    close(fd)
                    continue
                p = pend[fd] + res
                k, pend[fd] = divmod(p, REQ)
                if k:
                    arm_send(fd, RESPONSE * k)
                else:
                    arm_recv(fd)
            else:
                data = out.pop(fd, b"")
                if res < 0:
                    close(fd)
                elif res < len(data):
                    arm_send(fd, data[res:])
                else:
                    arm_recv(fd)


def serve_transport(ls: socket.socket, name: str) -> None:
    import trio

    from peerd.transport import Stream, get_transport

    ls.close()  # the transport opens its own listener
    transport = get_transport(name)

    async def handler(stream: Stream) -> None:
        buf = bytearray(REQ)
        while True:
            await stream.recv_exactly_into(buf)  # EOF: ConnectionClosed, serve() ends it
            await stream.send_all(RESPONSE)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listener = await nursery.start(
                lambda task_status: transport.serve(
                    "127.0.0.1", 0, handler, backlog=BACKLOG, task_status=task_status
                )
            )
            _announce(listener.port)

    trio.run(main)


def serve(model: str) -> None:
    _raise_nofile()
    ls = _listen()
    if model == "blocking":
        serve_blocking(ls)
    elif model == "busypoll":
        serve_busypoll(ls)
    elif model == "select":
        serve_select(ls)
    elif model == "poll":
        serve_poll(ls)
    elif model == "epoll":
        serve_epoll(ls)
    elif model == "sigio":
        serve_sigio(ls)
    elif model == "uring":
        serve_uring(ls)
    elif model in ("reactor", "proactor"):
        serve_transport(ls, model)
    else:
        raise SystemExit(f"unknown model {model!r}")


# --- load generator (``--worker PORT N``) -------------------------------------------


def _raise_nofile(need: int = 30000) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, hard), max(need, hard)))
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(port: int, n: int) -> None:
    """Hold ``n`` connections; run the phases the parent asks for on stdin."""
    _raise_nofile()
    socks: list[socket.socket] = []
    failed = ""
    t = time.monotonic()
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError as exc:
            failed = f"connect #{len(socks) + 1}: {exc}"
            break
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    ep = select.epoll()
    index = {}
    for i, s in enumerate(socks):
        ep.register(s.fileno(), select.EPOLLIN)
        index[s.fileno()] = i
    if not failed:  # one request/response on every connection: all really served
        failed = _phase_prime(ep, socks, index)
    _reply({"connected": len(socks), "failed": failed, "seconds": time.monotonic() - t})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        _reply(_phase_run(ep, socks, index, cmd["k"], cmd["t0"], cmd["warm"], cmd["window"]))
    for s in socks:
        s.close()


def _phase_prime(ep: Any, socks: list[socket.socket], index: dict[int, int]) -> str:
    got = [0] * len(socks)
    for s in socks:
        try:
            s.send(REQUEST)
        except OSError as exc:
            return f"prime send: {exc}"
    missing = len(socks)
    deadline = time.monotonic() + 60
    while missing:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"{missing} connections unanswered after 60 s"
        for fd, _ in ep.poll(min(left, 1.0)):
            i = index[fd]
            try:
                data = socks[i].recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                return f"prime recv: {exc}"
            if not data:
                return "server closed a connection"
            before = got[i]
            got[i] += len(data)
            if before < RESP <= got[i]:
                missing -= 1
    return ""


def _phase_run(
    ep: Any,
    socks: list[socket.socket],
    index: dict[int, int],
    k: int,
    t0: float,
    warm: float,
    window: float,
) -> dict[str, Any]:
    wstart, wend = t0 + warm, t0 + warm + window
    while time.monotonic() < t0:
        time.sleep(min(0.01, max(0.0, t0 - time.monotonic())))
    sent_at = [0.0] * len(socks)
    acc = [0] * len(socks)
    lat: list[int] = []
    errors = 0
    outstanding = 0
    now = time.monotonic()
    for i in range(k):
        sent_at[i] = now
        try:
            socks[i].send(REQUEST)
        except OSError:
            errors += 1
            continue
        outstanding += 1
    cpu0 = cpu1 = None
    recv_size = RECV_SIZE
    stop = wend + 10.0  # drain: every request sent gets its answer
    while outstanding and now < stop:
        if cpu0 is None and now >= wstart:
            cpu0 = _cpu_self()
        if cpu1 is None and now >= wend:
            cpu1 = _cpu_self()
        for fd, _ in ep.poll(0.02):
            i = index[fd]
            s = socks[i]
            try:
                data = s.recv(recv_size)
            except BlockingIOError:
                continue
            except OSError:
                errors += 1
                continue
            if not data:
                errors += 1
                ep.unregister(fd)
                if i < k:
                    outstanding -= 1
                continue
            now = time.monotonic()
            if acc[i] == 0 and data == RESPONSE:
                done = 1
            else:
                acc[i] += len(data)
                done, acc[i] = divmod(acc[i], RESP)
                if done:
                    errors += done - 1  # more answers than requests
            if done and i < k:
                if wstart <= now <= wend:
                    lat.append(int((now - sent_at[i]) * 1e6))
                if now < wend:
                    sent_at[i] = now
                    try:
                        s.send(REQUEST)
                    except OSError:
                        errors += 1
                        outstanding -= 1
                else:
                    outstanding -= 1
        now = time.monotonic()
    if cpu0 is None:
        cpu0 = _cpu_self()
    if cpu1 is None:
        cpu1 = _cpu_self()
    return {"n": len(lat), "lat": lat, "cpu": cpu1 - cpu0, "stuck": outstanding, "errors": errors}


# --- the driver --------------------------------------------------------------------


TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: all threads


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _readline(p: subprocess.Popen[str], timeout: float, what: str) -> str:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"{what}: no answer within {timeout:.0f} s")
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"{what}: process exited (rc={p.poll()})")
    return line


def start_server(model: str) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen(
        [sys.executable, __file__, "--serve", model],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = _readline(p, 30, f"{model} server")
    except BaseException:
        p.kill()
        p.wait()
        raise
    return p, int(line.split()[1])


def stop(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()
    if p.stdout is not None:
        p.stdout.close()
    if p.stdin is not None:
        with contextlib.suppress(OSError):
            p.stdin.close()


def uring_unavailable() -> str | None:
    from peerd.errors import TransportUnavailable
    from peerd.transport import get_transport

    try:
        get_transport("proactor")
    except TransportUnavailable as exc:
        return str(exc)
    return None


def skip_reason(model: str, c: int) -> str | None:
    if model == "select" and c + 16 > FD_SETSIZE:
        return f"select() cannot watch fds >= FD_SETSIZE ({FD_SETSIZE})"
    if model in ("uring", "proactor"):
        why = uring_unavailable()
        if why:
            return why
    return None


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def p99(lat: list[int]) -> float:
    if not lat:
        return math.nan
    lat = sorted(lat)
    return lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] / 1000.0


def run_group(
    model: str, c: int, actives: tuple[int, ...], warm: float, window: float
) -> list[dict[str, Any]]:
    """One server and C connections, then one measured phase per activity level."""
    rows = []
    base = {"model": model, "C": c}
    reason = skip_reason(model, c)
    if reason:
        return [{**base, "A": a, "skip": reason} for a in actives]
    server, port = start_server(model)
    workers: list[subprocess.Popen[str]] = []
    try:
        time.sleep(0.3)
        rss_idle = proc_rss_kib(server.pid)
        shares = [s for s in split(c, 1 if c < 20 else 2) if s]
        for n in shares:
            workers.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(port), str(n)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
            )
        hello = [json.loads(_readline(w, 180, "generator")) for w in workers]
        failed = "; ".join(h["failed"] for h in hello if h["failed"])
        if failed:
            return [{**base, "A": a, "skip": f"setup failed: {failed}"} for a in actives]
        time.sleep(0.2)
        rss_c = proc_rss_kib(server.pid)
        mem = (rss_c - rss_idle) / c
        for a in actives:
            k = max(1, round(c * a / 100))
            ks = split(k, len(workers))
            t0 = time.monotonic() + 0.1
            for w, kw in zip(workers, ks, strict=True):
                assert w.stdin is not None
                cmd = {"op": "run", "k": kw, "t0": t0, "warm": warm, "window": window}
                w.stdin.write(json.dumps(cmd) + "\n")
                w.stdin.flush()
            time.sleep(max(0.0, t0 + warm - time.monotonic()))
            cpu0 = proc_cpu(server.pid)
            sig0 = _sigio_stats(server) if model == "sigio" else None
            time.sleep(max(0.0, t0 + warm + window - time.monotonic()))
            cpu1 = proc_cpu(server.pid)
            sig1 = _sigio_stats(server) if model == "sigio" else None
            res = [json.loads(_readline(w, 60, "generator")) for w in workers]
            n = sum(r["n"] for r in res)
            lat = [x for r in res for x in r["lat"]]
            cpu = cpu1 - cpu0
            row = {
                **base,
                "A": a,
                "active": k,
                "rps": n / window,
                "p99_ms": p99(lat),
                "cpu_per_100k": cpu / n * 100_000 if n else math.nan,
                "server_cpu_pct": cpu / window * 100,
                "mem_kib_per_conn": mem,
                "gen_cpu_pct": sum(r["cpu"] for r in res) / window * 100,
                "errors": sum(r["errors"] for r in res),
                "unanswered": sum(r["stuck"] for r in res),
            }
            if sig0 is not None and sig1 is not None:
                runs = sig1[0] - sig0[0]
                row["sigio_runs_per_req"] = runs / n if n else math.nan
                row["sigio_scans_per_req"] = (sig1[1] - sig0[1]) / n if n else math.nan
                row["sigio_nested_per_req"] = (sig1[2] - sig0[2]) / n if n else math.nan
            rows.append(row)
            if server.poll() is not None:
                raise RuntimeError(f"{model} server exited (rc={server.returncode})")
    finally:
        for w in workers:
            if w.poll() is None and w.stdin is not None:
                with contextlib.suppress(OSError):
                    w.stdin.write('{"op": "quit"}\n')
                    w.stdin.flush()
        for w in workers:
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:
                pass
            stop(w)
        stop(server)
    return rows


def _sigio_stats(server: subprocess.Popen[str]) -> tuple[int, int, int]:
    server.send_signal(signal.SIGUSR1)
    _, runs, scans, nested = _readline(server, 10, "sigio stats").split()
    return int(runs), int(scans), int(nested)


# --- output ------------------------------------------------------------------------


def _fmt(v: float, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def note(row: dict[str, Any]) -> str:
    bits = []
    if row.get("errors"):
        bits.append(f"{row['errors']} connection errors")
    if row.get("unanswered"):
        bits.append(f"{row['unanswered']:,} requests still unanswered 10 s after the window")
    if "sigio_runs_per_req" in row:
        bits.append(
            f"per request: {_fmt(row['sigio_runs_per_req'], 3)} passes over all sockets, "
            f"{_fmt(row['sigio_scans_per_req'], 1)} sockets tried, "
            f"{_fmt(row['sigio_nested_per_req'], 2)} SIGIO handler calls nested in a running pass"
        )
    return "; ".join(bits)


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | C | A % | active | req/s | p99 ms | server CPU s / 100k req | server CPU % | server KiB / conn | generator CPU % | note |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        if "skip" in r:
            out.append(
                f"| {r['model']} | {r['C']:,} | {r['A']} | - | - | - | - | - | - | - | skipped: {r['skip']} |"
            )
            continue
        out.append(
            f"| {r['model']} | {r['C']:,} | {r['A']} | {r['active']:,} | {_fmt(r['rps'])} "
            f"| {_fmt(r['p99_ms'], 2)} | {_fmt(r['cpu_per_100k'], 2)} | {_fmt(r['server_cpu_pct'])} "
            f"| {_fmt(r['mem_kib_per_conn'], 1)} | {_fmt(r['gen_cpu_pct'])} | {note(r)} |"
        )
    return "\n".join(out)


def _minor_label(v: float, _pos: int) -> str:
    """Label the 2, 3 and 5 ticks of a log axis (values stay readable, no clutter)."""
    lead = v / 10 ** math.floor(math.log10(v))
    return f"{v:g}" if round(lead) in (2, 3, 5) else ""


def plot(rows: list[dict[str, Any]], path: Path, a: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "bench_io_models: --write-docs needs matplotlib, which is not a dependency of peer: "
            "install it with `.venv/bin/pip install -e '.[bench]'` (or `pip install matplotlib`)"
        ) from None
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    panels = (
        ("rps", f"requests/s (A = {a} %)"),
        ("cpu_per_100k", f"server CPU s per 100k requests (A = {a} %)"),
        ("mem_kib_per_conn", "server memory per connection, KiB"),
    )
    models = list(dict.fromkeys(r["model"] for r in rows))
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    for ax, (key, title) in zip(axes, panels, strict=True):
        for m in models:
            pts = sorted(
                (r["C"], r[key])
                for r in rows
                # memory: an RSS change below the page-level noise is left out (log axis)
                if r["model"] == m and r["A"] == a and "skip" not in r and r[key] > 0
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=m,
                    linewidth=1.5,
                    linestyle="--" if m in ("reactor", "proactor") else "-",
                )
        ax.set_xscale("log")
        if key != "rps":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.set_xlabel("connections C")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("The seed's I/O models: 64-byte request/response on loopback, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine(load_start: tuple[float, ...], load_end: tuple[float, ...]) -> str:
    return (
        f"Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}; shared with other engineers' test suites. "
        f"Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_start)}, "
        f"at end {'/'.join(f'{x:.2f}' for x in load_end)}. One run, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )


def write_docs(rows: list[dict[str, Any]], meta: str, command: str, a_plot: int) -> None:
    plot(rows, PNG, a_plot)
    block = "\n".join(
        [
            TABLE_START,
            f"`{command}`",
            "",
            meta,
            "",
            table(rows),
            "",
            f"![requests/s, CPU per request and memory per connection vs C at A = {a_plot} %]"
            f"(io_models.png)",
            TABLE_END,
        ]
    )
    if DOC.exists():
        text = DOC.read_text()
        if TABLE_START in text and TABLE_END in text:
            head, rest = text.split(TABLE_START, 1)
            _, tail = rest.split(TABLE_END, 1)
            DOC.write_text(head + block + tail)
            return
        DOC.write_text(text.rstrip("\n") + "\n\n" + block + "\n")
        return
    DOC.write_text(
        "# The seed's five I/O models, measured\n\n"
        "Written by `scripts/bench_io_models.py --write-docs`.\n\n" + block + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--serve", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=2, type=int, metavar=("PORT", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="reduced matrix, 1 s windows")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--conns", help="comma-separated connection counts (default 10,100,1000,10000)")
    ap.add_argument("--active", help="comma-separated active percentages (default 1,10,100)")
    ap.add_argument("--warm", type=float, help="warm-up seconds per cell (default 0.5)")
    ap.add_argument("--window", type=float, help="measured seconds per cell (default 2)")
    ap.add_argument("--write-docs", action="store_true", help="regenerate docs/IO_MODELS.md + PNG")
    ap.add_argument("--json", type=Path, help="also save the rows as JSON here")
    ap.add_argument("--from-json", type=Path, help="no run: format rows saved with --json")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.worker:
        worker(*args.worker)
        return
    _raise_nofile()
    models = tuple(args.models.split(",")) if args.models else MODELS
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {', '.join(bad)}: choose from {', '.join(MODELS)}")
    try:
        conns = tuple(int(x) for x in args.conns.split(",")) if args.conns else None
        actives = tuple(int(x) for x in args.active.split(",")) if args.active else None
    except ValueError:
        ap.error("--conns and --active take comma-separated integers")
    conns = conns or (QUICK_CONNS if args.quick else CONNS)
    actives = actives or (QUICK_ACTIVE if args.quick else ACTIVE)
    if any(c < 1 or c > 10000 for c in conns) or any(a < 1 or a > 100 for a in actives):
        ap.error("C must be in 1..10000 and A in 1..100")
    warm = args.warm if args.warm is not None else (0.3 if args.quick else 0.5)
    window = args.window if args.window is not None else (1.0 if args.quick else 2.0)
    command = "python scripts/bench_io_models.py " + " ".join(sys.argv[1:])
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows, meta, command = saved["rows"], saved["meta"], saved["command"]
    else:
        load_start = os.getloadavg()
        rows = []
        for model in models:
            for c in conns:
                t = time.monotonic()
                try:
                    got = run_group(model, c, actives, warm, window)
                except RuntimeError as exc:
                    got = [
                        {"model": model, "C": c, "A": a, "skip": f"failed: {exc}"} for a in actives
                    ]
                rows.extend(got)
                print(f"# {model} C={c}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        meta = machine(load_start, os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "meta": meta, "command": command}))
    print(meta)
    print()
    print(table(rows))
    if args.write_docs:
        a_plot = 10 if 10 in actives else actives[0]
        write_docs(rows, meta, command, a_plot)
        print(f"\nwrote {DOC.relative_to(ROOT)} and {PNG.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
