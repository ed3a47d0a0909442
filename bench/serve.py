"""Runs one benchmark app under uvicorn (uvloop + httptools), as the HTTP scenarios need it.

``python -m bench.serve MODULE:APP PORT [--sndbuf BYTES]`` listens on 127.0.0.1:PORT. With
``--sndbuf`` the listening socket's SO_SNDBUF is pinned small (accepted sockets inherit it):
without that, Linux autotunes a loopback send buffer up to ~4 MiB and a slow reader never slows
the server down. With ``--gc-file PATH`` the server counts the garbage collector's runs and
time (``gc.callbacks``); each line read on stdin makes it write them to PATH as
``{"seq": LINE, "collections": [gen0, gen1, gen2], "seconds": S}``, from a thread, so an idle
event loop answers at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import threading
import time

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("app")
    parser.add_argument("port", type=int)
    parser.add_argument("--sndbuf", type=int, default=0)
    parser.add_argument("--gc-file", default="")
    args = parser.parse_args()
    if args.gc_file:
        report_gc(args.gc_file)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(2048)
    config = uvicorn.Config(
        args.app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        backlog=2048,
    )
    uvicorn.Server(config).run(sockets=[sock])


def report_gc(path: str) -> None:
    collections = [0, 0, 0]
    seconds = [0.0]
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            seconds[0] += time.perf_counter() - started.pop()
            collections[info["generation"]] += 1

    def answer() -> None:
        for line in sys.stdin:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(
                    {"seq": line.strip(), "collections": collections, "seconds": seconds[0]}, f
                )
            os.replace(tmp, path)

    gc.callbacks.append(on_gc)
    threading.Thread(target=answer, daemon=True).start()


if __name__ == "__main__":
    main()
