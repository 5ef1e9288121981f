"""Rendezvous stores of the standard library. Communicators need only set(key, value) and a get(key)
that waits for the key, so torch.distributed's TCPStore / FileStore work as they are."""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import threading
import time
import urllib.parse


def _as_bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class FileStore:
    """Keys are files in a directory every rank can see (one node, or a shared file system)."""

    def __init__(self, path: str, timeout: float = 30.0):
        if timeout <= 0:
            raise ValueError(f"timeout: expected > 0 seconds, got {timeout}")
        self.path = os.fspath(path)
        self.timeout = timeout
        os.makedirs(self.path, exist_ok=True)

    def _file(self, key: str) -> str:
        return os.path.join(self.path, urllib.parse.quote(key, safe=""))

    def set(self, key: str, value) -> None:
        tmp = f"{self._file(key)}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(_as_bytes(value))
        os.replace(tmp, self._file(key))  # readers never see a partial value

    def get(self, key: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        delay = 1e-4
        while True:
            try:
                with open(self._file(key), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"FileStore: key '{key}' not set within {self.timeout} s") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("TCPStore: connection closed")
        buf += chunk
    return bytes(buf)


def _send_frame(sock: socket.socket, *parts: bytes) -> None:
    sock.sendall(b"".join(struct.pack("!I", len(p)) + p for p in parts))


def _recv_frame(sock: socket.socket, count: int) -> list[bytes]:
    return [_recv_exact(sock, struct.unpack("!I", _recv_exact(sock, 4))[0]) for _ in range(count)]


class TCPStore:
    """A key-value server in the master process (a thread); every rank, master included, is a client.

    Requests are frames (op, key[, value]); a get waits on the server until the key is set or the
    timeout passes."""

    def __init__(self, host: str, port: int, is_master: bool, timeout: float = 30.0):
        if timeout <= 0:
            raise ValueError(f"timeout: expected > 0 seconds, got {timeout}")
        self.timeout = timeout
        self._server = None
        if is_master:
            self._server = _StoreServer((host, port), timeout)
            port = self._server.server_address[1]
            threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.host, self.port = host, port
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.create_connection((host, port), timeout=timeout + 5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"TCPStore: no server at {host}:{port} within {timeout} s") from None
                time.sleep(0.05)
        self._lock = threading.Lock()

    def set(self, key: str, value) -> None:
        with self._lock:
            _send_frame(self._sock, b"S", key.encode(), _as_bytes(value))
            _recv_frame(self._sock, 1)

    def get(self, key: str) -> bytes:
        with self._lock:
            _send_frame(self._sock, b"G", key.encode(), b"")
            status, value = _recv_frame(self._sock, 2)
        if status != b"ok":
            raise TimeoutError(f"TCPStore: key '{key}' not set within {self.timeout} s")
        return value

    def close(self) -> None:
        self._sock.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _StoreServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, timeout: float):
        self.data: dict[bytes, bytes] = {}
        self.cond = threading.Condition()
        self.wait_timeout = timeout
        super().__init__(address, _StoreHandler)


class _StoreHandler(socketserver.BaseRequestHandler):
    def handle(self):
        server: _StoreServer = self.server  # type: ignore[assignment]
        while True:
            try:
                op, key, value = _recv_frame(self.request, 3)
            except (ConnectionError, OSError):
                return
            with server.cond:
                if op == b"S":
                    server.data[key] = value
                    server.cond.notify_all()
                    reply = [b"ok"]
                else:
                    found = server.cond.wait_for(lambda: key in server.data, timeout=server.wait_timeout)
                    reply = [b"ok", server.data[key]] if found else [b"timeout", b""]
            _send_frame(self.request, *reply)
