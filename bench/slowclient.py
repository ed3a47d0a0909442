"""Slow clients: many concurrent GETs of one streamed response, each read slowly.

``python -m bench.slowclient PORT PATH --clients N --rate BYTES_PER_S ...`` prints one JSON
object: one record per client and what PostgreSQL said while they ran.

Each client sets a small SO_RCVBUF before it connects and reads ``read_bytes`` at a time, then
sleeps, so the server's (small) send buffer fills and it can only go as fast as the client
reads. A body is complete when its chunked encoding ends with the last chunk and holds all the
bytes expected; a 200 whose connection ends before that is truncated.

While they run, a separate connection counts the app's connections that PostgreSQL sees busy
(``state <> 'idle'``: active, or idle in a transaction) every 100 ms; after they end (and a
short grace), what is still busy is what the app left checked out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from typing import Any

import asyncpg

BUSY = """
    SELECT count(*) FILTER (WHERE state <> 'idle'), count(*)
    FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()
"""


def parse_response(raw: bytes) -> dict[str, Any]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return {"status": 0, "headers": {}, "body_bytes": 0, "complete": False}
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        size, complete, pos = 0, False, 0
        while True:
            eol = body.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                n = int(body[pos:eol].split(b";")[0], 16)
            except ValueError:
                break
            if n == 0:
                complete = True
                break
            if eol + 2 + n + 2 > len(body):
                size += max(0, len(body) - (eol + 2))
                break
            size += n
            pos = eol + 2 + n + 2
        return {"status": status, "headers": headers, "body_bytes": size, "complete": complete}
    length = int(headers.get("content-length", "-1"))
    return {
        "status": status,
        "headers": headers,
        "body_bytes": len(body),
        "complete": length < 0 or len(body) >= length,
    }


async def one_client(
    port: int, path: str, args: argparse.Namespace, t_start: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    sock.setblocking(False)
    raw = bytearray()
    t_status = None
    error = ""
    deadline = t_start + args.deadline
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 10)
        req = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
        await loop.sock_sendall(sock, req)
        slow = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                error = "deadline"
                break
            data = await asyncio.wait_for(loop.sock_recv(sock, args.read_bytes), left)
            if not data:
                break
            raw += data
            if t_status is None and b"\r\n" in raw:
                t_status = time.monotonic() - t_start
                slow = raw.startswith(b"HTTP/1.1 200")
            if slow:
                await asyncio.sleep(len(data) / args.rate)
    except (OSError, TimeoutError) as exc:
        error = error or f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    res = parse_response(bytes(raw))
    res["t_status"] = t_status
    res["t_end"] = time.monotonic() - t_start
    res["error"] = error
    res["retry_after"] = res.pop("headers").get("retry-after")
    res["complete"] = res["complete"] and res["body_bytes"] >= args.expect_bytes
    return res


async def poll_busy(dsn: str, app_name: str, stop: asyncio.Event, out: dict[str, Any]) -> None:
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "tether-bench-probe"})
    try:
        while not stop.is_set():
            busy, total = await conn.fetchrow(BUSY, app_name)
            out["max_busy"] = max(out["max_busy"], busy)
            out["max_total"] = max(out["max_total"], total)
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except TimeoutError:
                pass
        await asyncio.sleep(out["grace"])
        busy, total = await conn.fetchrow(BUSY, app_name)
        out["left_busy"], out["left_total"] = busy, total
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    pg: dict[str, Any] = {"max_busy": 0, "max_total": 0, "grace": args.grace}
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_busy(args.dsn, args.app_name, stop, pg)) if args.dsn else None
    t_start = time.monotonic()
    clients = await asyncio.gather(
        *(one_client(args.port, args.path, args, t_start) for _ in range(args.clients))
    )
    wall = time.monotonic() - t_start
    stop.set()
    if poller is not None:
        await poller
    return {"clients": clients, "wall": wall, "pg": pg}


def run() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--rate", type=float, default=128 * 1024, help="bytes/s per client")
    p.add_argument("--read-bytes", type=int, default=4096)
    p.add_argument("--rcvbuf", type=int, default=4096)
    p.add_argument("--expect-bytes", type=int, default=256 * 1024)
    p.add_argument("--deadline", type=float, default=60.0, help="seconds per client, at most")
    p.add_argument("--dsn", default="")
    p.add_argument("--app-name", default="tether-bench-stream")
    p.add_argument("--grace", type=float, default=0.5)
    args = p.parse_args()
    print(json.dumps(asyncio.run(main(args))))


if __name__ == "__main__":
    run()
