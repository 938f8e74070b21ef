"""Does a broker answer on loopback? `python3 .ci/probe_broker.py KIND` exits 0 when it does.
Speaks just enough of each protocol (stdlib only: it runs before the venv exists)."""

import socket
import sys

PROBES = {
    # server speaks first: INFO {... "jetstream":true ...}
    "nats": (4222, b"", lambda r: r.startswith(b"INFO ") and b'"jetstream":true' in r),
    # protocol header -> Connection.Start (a method frame, type 1)
    "amqp": (5672, b"AMQP\x00\x00\x09\x01", lambda r: r[:1] == b"\x01"),
    "redis": (6379, b"PING\r\n", lambda r: r.startswith(b"+PONG")),
    # CONNECT (MQTT 3.1.1, clean session, client id "ci") -> CONNACK accepted
    "mqtt": (
        1883,
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02ci",
        lambda r: r[:1] == b"\x20" and r[3:4] == b"\x00",
    ),
}


def answers(kind: str) -> bool:
    port, hello, ok = PROBES[kind]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            if hello:
                sock.sendall(hello)
            data = b""
            while len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
                if ok(data):
                    return True
    except OSError:
        return False
    return False


if __name__ == "__main__":
    sys.exit(0 if answers(sys.argv[1]) else 1)
