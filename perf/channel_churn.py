#!/usr/bin/env python3
"""Subscribe to many distinct channels, a thousand per connection, and close: the owner's
per-channel state must not outlive its use. For perf/channel_churn.sh.

Usage: channel_churn.py HOST:PORT KEY CHANNELS [PREFIX]
"""
import os
import socket
import sys


def frame(text):
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_until(s, needle):
    got = b""
    while needle not in got:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("server closed the connection")
        got = got[-len(needle):] + chunk


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    key, total = sys.argv[2], int(sys.argv[3])
    prefix = sys.argv[4] if len(sys.argv) > 4 else "c"
    for start in range(0, total, 1000):
        s = socket.create_connection((host, int(port)))
        s.sendall(
            f"GET /ws?key={key} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        end = min(start + 1000, total)
        # A SUB names at most 100 channels.
        for first in range(start, end, 100):
            names = ",".join(
                f'"org:{prefix}{i}:usage"' for i in range(first, min(first + 100, end))
            )
            s.sendall(frame('{"type":"SUB","channels":[%s],"id":%d}' % (names, first)))
        read_until(s, b'"id":%d' % (first,))
        s.close()


if __name__ == "__main__":
    main()
