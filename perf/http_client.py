#!/usr/bin/env python3
"""Send-to-user latency for perf/http.sh (issue 14).

  http_client.py send HOST:PORT KEY JWT_SECRET ROUNDS
      A connection of user u1 (a JWT made here), and a backend on a keep-alive HTTP
      connection sending POST /api/users/u1/send ROUNDS times, one at a time: microseconds
      from the request's first byte to the MESSAGE on the user's connection, p50/p99/max.

A bare-socket WebSocket and HTTP client (the standard library only), as perf/slow_subscriber.py.
"""
import base64
import hashlib
import hmac
import json
import os
import socket
import sys
import time


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(secret, claims):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


class Ws:
    def __init__(self, addr, path):
        host, port = addr.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(4096)
        self.buf = self.buf.split(b"\r\n\r\n", 1)[1]

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def text(self):
        while True:
            self._need(2)
            op, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
            at = 2
            if n == 126:
                self._need(4)
                n, at = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                self._need(10)
                n, at = int.from_bytes(self.buf[2:10], "big"), 10
            self._need(at + n)
            payload, self.buf = self.buf[at : at + n], self.buf[at + n :]
            if op == 1:
                return json.loads(payload)


class Http:
    def __init__(self, addr, key):
        host, port = addr.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.key = key
        self.buf = b""

    def post(self, path, body):
        data = json.dumps(body).encode()
        self.s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {self.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
        )

    def response(self):
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(65536)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(self.buf) < length:
            self.buf += self.s.recv(65536)
        body, self.buf = self.buf[:length], self.buf[length:]
        return json.loads(body)


def send(addr, key, secret, rounds):
    token = jwt(secret, {"sub": "u1", "org": "bench", "exp": int(time.time()) + 3600})
    user = Ws(addr, f"/ws?token={token}")
    assert user.text()["type"] == "READY"
    backend = Http(addr, key)
    took = []
    for i in range(rounds):
        start = time.perf_counter()
        backend.post("/api/users/u1/send", {"data": {"n": i}})
        while True:
            m = user.text()
            if m.get("type") == "MESSAGE":
                break
        took.append((time.perf_counter() - start) * 1e6)
        answer = backend.response()
        assert answer["reached"] == 1, answer
    took.sort()
    pct = lambda p: took[min(len(took) - 1, int(len(took) * p))]
    print(f"send to a connected user, {rounds} rounds: p50 {pct(0.5):.0f} us, "
          f"p99 {pct(0.99):.0f} us, max {took[-1]:.0f} us")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(__doc__)
