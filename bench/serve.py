"""Runs one benchmark app under uvicorn (uvloop + httptools), as the HTTP scenarios need it.

``python -m bench.serve MODULE:APP PORT [--sndbuf BYTES]`` listens on 127.0.0.1:PORT. With
``--sndbuf`` the listening socket's SO_SNDBUF is pinned small (accepted sockets inherit it):
without that, Linux autotunes a loopback send buffer up to ~4 MiB and a slow reader never slows
the server down.
"""

from __future__ import annotations

import argparse
import socket

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("app")
    parser.add_argument("port", type=int)
    parser.add_argument("--sndbuf", type=int, default=0)
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
