"""A TCP proxy on 127.0.0.1 that can cut the line: a network partition between one process and a
server, in the test process (threads), without root or namespaces.

``partition()``: bytes in either direction are dropped and new connections are accepted but never
forwarded — to the client the server went silent (a partition, not a refused connection).
``heal()``: every connection is closed, so clients reconnect and get through again.
``lose_next_answer()``: the server's next answer is dropped and its connection cut, after the
server has received and acted on the request — a reply lost on the way back."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._lose_answer = threading.Event()
        self.answers_lost = 0
        self.dropped = 0  # bytes dropped while partitioned
        self.held = 0  # connections accepted while partitioned (never answered)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets.extend(socks)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._track(client)
            if self._cut.is_set():
                self.held += 1
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._track(upstream)
            for src, dst, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, answers), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            if answers and self._lose_answer.is_set():
                self._lose_answer.clear()
                self.answers_lost += 1
                break  # both sockets shut below: the client reads a cut connection, not the answer
            if self._cut.is_set():
                self.dropped += len(data)
                continue
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def lose_next_answer(self) -> None:
        self._lose_answer.set()

    def partition(self) -> None:
        self._cut.set()

    def heal(self) -> None:
        self._cut.clear()
        with self._lock:
            socks, self._sockets = self._sockets, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.heal()
        self._server.close()
