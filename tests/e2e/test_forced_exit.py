"""A forced exit under a real uvicorn: Ctrl-C, then Ctrl-C again during the drain, with a
request in flight. uvicorn skips the lifespan shutdown, and `asyncio.run` cancels every
task at once, tether's holders of the app resources included. Before, they closed in
task-cancel order (a resource before what uses it), each logged at ERROR as "failed while
the app ran"; now as at a shutdown: what uses one first, each once."""

from __future__ import annotations

import signal
import socket
import time

from tests.e2e.conftest import Server


def test_a_second_ctrl_c_closes_the_app_resources_in_order(serve: type[Server]) -> None:
    server = serve("tests.e2e.app_forced_exit:app")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"GET /sleep HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("sleep start")
        time.sleep(0.2)
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        # uvicorn waits for the request: "Waiting for connections to close. (CTRL+C to force
        # quit)"; a second Ctrl-C forces the exit.
        server.proc.send_signal(signal.SIGINT)
        server.wait(20)
    output = server.output()
    closes = [e for e in server.events() if e.endswith(" close")]
    assert closes == ["marker close", "feed close", "cache close", "settings close"], output
    assert "failed while the app ran" not in output
    assert "tether: the app scope was cancelled from outside" in output
