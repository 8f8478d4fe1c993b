#!/usr/bin/env python3
"""A subscriber that reads slowly: a 4 KiB receive buffer, 512 bytes every 100 ms (about
5 KB/s), a PING every 10 s so the server does not time it out. For perf/soak.sh.

Usage: slow_subscriber.py HOST:PORT KEY CHANNEL
"""
import os
import socket
import sys
import time


def frame(text):
    payload = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81, 0x80 | len(payload)]) + mask
    return head + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    key, channel = sys.argv[2], sys.argv[3]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(
        f"GET /ws?key={key} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    s.sendall(frame('{"type":"SUB","channels":["%s"]}' % channel))
    last_ping = time.monotonic()
    while True:
        if not s.recv(512):
            return
        if time.monotonic() - last_ping > 10:
            s.sendall(frame('{"type":"PING"}'))
            last_ping = time.monotonic()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
