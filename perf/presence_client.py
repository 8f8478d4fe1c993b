#!/usr/bin/env python3
"""Presence and exclusive-session measurements for perf/presence.sh (issue 13).

  presence_client.py kill A_HOST:PORT B_HOST:PORT KEY ROUNDS
      An exclusive session moved ROUNDS times from a connection on node A to a newer one on
      node B: milliseconds from the newer one's READY to the older one's close frame (<= 0:
      the older was closed first), p50/p99.
  presence_client.py presence HOST:PORT KEY MEMBERS
      MEMBERS connections SUB org:bench:usage with presence, then another connection pages
      through PRESENCE: the first page's and the whole listing's time, 5 times.

A bare-socket WebSocket client (the standard library only), as perf/slow_subscriber.py.
"""
import os
import resource
import socket
import struct
import sys
import time


def frame(text):
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    else:
        head = bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Conn:
    def __init__(self, addr, path, rcvbuf=None):
        host, port = addr.rsplit(":", 1)
        self.s = socket.socket()
        if rcvbuf:
            # Members that do not read: a small window, so that what the server cannot send
            # waits in its bounded queue, not in the kernel.
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.s.connect((host, int(port)))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._read()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(head.decode(errors="replace"))

    def _read(self):
        data = self.s.recv(65536)
        if not data:
            raise EOFError
        return data

    def _need(self, n):
        while len(self.buf) < n:
            self.buf += self._read()

    def recv(self):
        """The next frame: (opcode, payload)."""
        self._need(2)
        op, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        at = 2
        if n == 126:
            self._need(4)
            n, at = struct.unpack(">H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, at = struct.unpack(">Q", self.buf[2:10])[0], 10
        self._need(at + n)
        payload, self.buf = self.buf[at : at + n], self.buf[at + n :]
        return op, payload

    def recv_text_starting(self, prefix):
        while True:
            op, payload = self.recv()
            if op == 8:
                raise EOFError(payload)
            if op == 1 and payload.startswith(prefix):
                return payload

    def send(self, text):
        self.s.sendall(frame(text))


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def kill(a, b, key, rounds):
    waits = []
    for i in range(rounds):
        path = f"/ws?key={key}&session=k{i}"
        older = Conn(a, path)
        older.recv_text_starting(b'{"type":"READY"')
        newer = Conn(b, path)
        newer.recv_text_starting(b'{"type":"READY"')
        ready = time.perf_counter()
        while True:
            op, _ = older.recv()
            if op == 8:
                break
        waits.append((time.perf_counter() - ready) * 1000)
        older.s.close()
        newer.s.close()
    print(
        f"kill switch, {rounds} takeovers A -> B: READY to close p50 {percentile(waits, 50):.2f} ms,"
        f" p99 {percentile(waits, 99):.2f} ms, max {max(waits):.2f} ms"
    )


def presence(addr, key, members):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    channel = "org:bench:usage"
    conns = []
    started = time.perf_counter()
    for _ in range(members):
        c = Conn(addr, f"/ws?key={key}", rcvbuf=4096)
        c.send(f'{{"type":"SUB","channels":["{channel}"],"presence":true,"id":"s"}}')
        conns.append(c)
    for c in conns:
        # Before the JOINs of later members fill its window.
        c.recv_text_starting(b'{"type":"SUBSCRIBED"')
    joined = time.perf_counter() - started
    asker = Conn(addr, f"/ws?key={key}")
    asker.recv_text_starting(b'{"type":"READY"')
    firsts, wholes = [], []
    for _ in range(5):
        cursor, pages, total = None, 0, None
        t0 = time.perf_counter()
        while True:
            ask = f'{{"type":"PRESENCE","channel":"{channel}","id":"p"'
            ask += f',"cursor":"{cursor}"}}' if cursor else "}"
            asker.send(ask)
            page = asker.recv_text_starting(b'{"type":"PRESENCE"')
            if pages == 0:
                firsts.append((time.perf_counter() - t0) * 1000)
                total = page.split(b'"total":', 1)[1].split(b",", 1)[0].decode()
            pages += 1
            if b'"cursor":"' not in page:
                break
            cursor = page.split(b'"cursor":"', 1)[1].split(b'"', 1)[0].decode()
        wholes.append((time.perf_counter() - t0) * 1000)
    print(
        f"PRESENCE, {members} members (total {total}, {pages} pages; joined in {joined:.1f} s):"
        f" first page median {percentile(firsts, 50):.2f} ms, all pages median"
        f" {percentile(wholes, 50):.2f} ms (of 5)"
    )


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "kill":
        kill(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif what == "presence":
        presence(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
