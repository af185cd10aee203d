"""An application using the Python SDK, driven by tests/python_sdk.rs: it serves a TCP echo
on a port of its host (both families) and holds the port's opening as the test tells it on
stdin, reporting each step on stdout, so that the test checks from outside what the lease
does.

    sdk_driver.py with PORT     open in `with`, release at the block's end ("release")
    sdk_driver.py gc PORT       open, then drop the lease and collect it ("drop")
    sdk_driver.py async PORT    as `with`, with AsyncClient and `async with`
    sdk_driver.py twice PORT    open the same opening twice, release one then the other
                                ("release" before each)
    sdk_driver.py denied PORT   open a port the policy denies: prints the exception
    sdk_driver.py unbound PORT  open a port nobody binds: prints the exception

The agent's socket comes from FWNP_AGENT_SOCKET.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import threading
from datetime import timedelta

import fwnp


def say(*words: object) -> None:
    print(*words, flush=True)


def expect(line: str) -> None:
    got = sys.stdin.readline().strip()
    if got != line:
        raise SystemExit(f"expected {line!r} on stdin, got {got!r}")


def echo_server(port: int) -> socket.socket:
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("::", port))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    return server


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    lifetime = timedelta(minutes=5)
    if mode == "with":
        echo_server(port)
        with fwnp.Client() as client:
            with client.open(fwnp.tcp(port), lifetime=lifetime, name="py-with") as lease:
                say("held", lease.id, len(lease.grants))
                expect("release")
            say("released", lease.active)
            expect("exit")
    elif mode == "gc":
        echo_server(port)
        client = fwnp.Client()
        lease = client.open(fwnp.tcp(port), lifetime=lifetime, name="py-gc")
        say("held", lease.id, len(lease.grants))
        expect("drop")
        del lease
        gc.collect()
        say("dropped", client.status().connected)
        expect("exit")
        client.close()
    elif mode == "async":
        echo_server(port)

        async def run() -> None:
            async with fwnp.AsyncClient() as client:
                async with client.open(fwnp.tcp(port), lifetime=lifetime, name="py-async") as lease:
                    say("held", lease.id, len(lease.grants))
                    await asyncio.get_running_loop().run_in_executor(None, expect, "release")
                say("released", lease.active)
                await asyncio.get_running_loop().run_in_executor(None, expect, "exit")

        asyncio.run(run())
    elif mode == "twice":
        echo_server(port)
        with fwnp.Client() as client:
            first = client.open(fwnp.tcp(port), lifetime=lifetime, name="py-twice")
            second = client.open(fwnp.tcp(port), lifetime=lifetime, name="py-twice")
            say("held", first.id, len(first.grants), first.id == second.id, first is not second)
            expect("release")
            first.release()
            say("released", first.active, second.active)
            expect("release")
            second.release()
            say("released", first.active, second.active)
            expect("exit")
    elif mode in ("denied", "unbound"):
        if mode == "denied":
            echo_server(port)
        with fwnp.Client() as client:
            try:
                lease = client.open(fwnp.tcp(port), lifetime=lifetime)
            except fwnp.Denied as e:
                say("refused", type(e).__name__, e.code, isinstance(e, fwnp.FwnpError))
            else:
                say("granted", lease.id)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
