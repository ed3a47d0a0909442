"""A soak with random faults (reliability.md, test 18): ``make soak``, or
``python -m tests.soak --minutes 30``.

A real PostgreSQL (started here, as the test suite does), a fault proxy in front of it
(`tests/faultproxy.py`), and `tests/soak_app.py` under a real uvicorn, driven by 16 clients
that echo numbers through asyncpg and SQLAlchemy, and leave slow queries mid-way. Every few
seconds one fault, in a shuffled cycle:

* ``kill-idle``: idle backends of the app ended on the server, again and again (test 17);
* ``cut``: every connection reset (a proxy or a NAT dropping them);
* ``latency``: 20 ms each way on every packet;
* ``blackhole``: packets dropped, no reset, for up to 2 s (test 5);
* ``restart``: PostgreSQL restarted (test 4);
* ``disconnects``: a burst of clients leaving mid-query (tests 6 and 7).

After each fault the load pauses and the server is read at rest. What must hold, all run:

* every answer is a 200 with the number asked for, or a 503 with ``Retry-After`` (never
  another status, never another request's number, never a request that hangs), but for the
  500 of a commit whose connection was lost under it (its outcome cannot be known), each
  matched by its record in the server's log;
* at rest: nothing in use in tether, the pools or the server (no backend active or idle in
  a transaction), and no more backends than the pools' maxima;
* against the first rest after a full warm-up cycle, at the last: asyncio tasks and file
  descriptors (less the pools' open connections) within 2, resident memory within 5 %;
* the readiness probe, asked once a second, answers within 1 s under load (a probe queued
  behind the traffic would take a pool's timeout, seconds; one took 298 ms on this 2-core
  machine when it ran slow; during a fault it may take its check's timeout: the database
  does not answer);
* SIGTERM at the end: uvicorn exits 0, the server keeps no backend of the app, and the log
  has no error that escaped the app, no traceback but those lost commits', no destroyed task
  and no resource warning.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx

from tests.faultproxy import FaultProxy
from tests.servers import Postgres, _pg_url
from tests.serving import Server

FAULTS = ("kill-idle", "cut", "latency", "blackhole", "restart", "disconnects")
CLIENTS = 16
MAX_BACKENDS = 5 + 3  # soak_app.py: MAX_PG + MAX_SA
LOG_MARKERS = (
    "Exception in ASGI application",  # an error that escaped the app: a 500 nobody chose
    "Task was destroyed",
    "ResourceWarning",
    "was never awaited",
)
# A commit whose connection was lost under it: its outcome cannot be known from the client,
# so tether answers 500 (the one 500 the soak accepts) and logs it with its traceback.
LOST_AT_COMMIT = (
    "connection was closed",
    "ConnectionDoesNotExist",
    "AdminShutdown",
    "terminating connection",
    "Connection reset",
    "server closed the connection",
)


@dataclass
class Rest:
    """The server read at rest, after a fault."""

    after: str
    tasks: int
    fds: int  # less the pools' open connections
    rss_kib: int
    backends: int
    types: dict[str, int] = field(default_factory=dict)  # objects by type, at rest


@dataclass
class Report:
    seconds: float = 0.0
    answers: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    rests: list[Rest] = field(default_factory=list)
    ready_max_ms: float = 0.0
    baseline: Rest | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [
            f"soak: {self.seconds:.0f} s, faults {dict(self.faults)}",
            f"answers: {dict(self.answers)}",
            f"readiness: slowest answer {self.ready_max_ms:.0f} ms",
        ]
        if self.baseline is not None and self.rests:
            last = self.rests[-1]
            base = self.baseline
            growth = 100.0 * (last.rss_kib - base.rss_kib) / base.rss_kib
            lines.append(
                f"at rest, baseline -> last: tasks {base.tasks} -> {last.tasks}, fds "
                f"{base.fds} -> {last.fds}, RSS {base.rss_kib} -> {last.rss_kib} KiB "
                f"({growth:+.1f} %), backends {base.backends} -> {last.backends}"
            )
            grown = sorted(
                ((n - base.types.get(t, 0), t) for t, n in last.types.items()), reverse=True
            )[:8]
            lines.append("objects grown most: " + ", ".join(f"{t} {d:+d}" for d, t in grown))
        lines += [f"PROBLEM: {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"... and {len(self.problems) - 20} more")
        return "\n".join(lines)


class Soak:
    def __init__(self, pg: Postgres, tmp: Path, *, fault_seconds: float, quiet_seconds: float):
        self.pg = pg
        self.tmp = tmp
        self.fault_seconds = fault_seconds
        self.quiet_seconds = quiet_seconds
        self.app_name = f"soak-{uuid.uuid4().hex[:8]}"
        self.report = Report()
        self.running = anyio.Event()  # set while the load runs
        self.stopping = False
        self.phase = "load"  # "load", a fault's name, "recovery after ...", "rest"
        self.active = 0  # clients in a request now
        self.reported: set[str] = set()  # log lines already reported
        self.http: httpx.AsyncClient
        self.proxy = FaultProxy(pg.port).start()
        self.server = Server(
            "tests.soak_app:app",
            tmp,
            env={
                "SOAK_DSN": _pg_url("postgresql", self.proxy.port, None, no_tls_probe=True),
                "SOAK_APP": self.app_name,
            },
        )

    def problem(self, what: str) -> None:
        self.report.problems.append(f"[{self.phase}] {what}")

    # ------------------------------------------------------------------ load

    def load_client(self) -> httpx.AsyncClient:
        # Idle connections expire before uvicorn's keep-alive timeout (5 s) closes them: a
        # request sent on a connection the server is closing fails without an answer.
        limits = httpx.Limits(max_connections=CLIENTS + 20, keepalive_expiry=2.0)
        return httpx.AsyncClient(base_url=self.server.base_url, timeout=15.0, limits=limits)

    async def client(self, rng: random.Random) -> None:
        while not self.stopping:
            await self.running.wait()
            self.active += 1
            try:
                roll = rng.random()
                if roll < 0.08:
                    await self.leave_mid_query(self.http, rng)
                    continue
                x = rng.randrange(1_000_000)
                route = f"/pg/{x}" if roll < 0.6 else f"/sa/{x}"
                await self.ask(self.http, route, x)
            finally:
                self.active -= 1

    async def ask(self, http: httpx.AsyncClient, route: str, x: int) -> None:
        kind = route.split("/")[1]
        try:
            r = await http.get(route)
        except httpx.TimeoutException:
            self.problem(f"{route}: no answer within the client's 15 s (a hang)")
            return
        except httpx.TransportError as exc:
            self.problem(f"{route}: {type(exc).__name__}: {exc}")
            return
        if r.status_code == 200:
            got = r.json().get("x")
            if got != x:
                self.problem(f"{route}: answered {got}, another request's number (cross-talk)")
            self.report.answers[f"{kind} 200"] += 1
        elif r.status_code == 503 and "retry-after" in r.headers:
            self.report.answers[f"{kind} 503"] += 1
        elif r.status_code == 500 and r.headers.get("content-type") == "application/json":
            # tether's answer to a failed commit; checked against the log in finish()
            self.report.answers[f"{kind} 500"] += 1
        else:
            self.problem(f"{route}: {r.status_code} {r.text[:300]}")

    async def leave_mid_query(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        with anyio.move_on_after(rng.uniform(0.02, 0.3)):
            try:
                await http.get("/slow", params={"seconds": 1.0})
            except httpx.HTTPError:
                pass
            return
        self.report.answers["left mid-query"] += 1

    async def readiness(self, http: httpx.AsyncClient) -> None:
        while not self.stopping:
            t0, phase = time.monotonic(), self.phase
            try:
                await http.get("/health/ready")
            except httpx.HTTPError as exc:
                self.problem(f"/health/ready: {type(exc).__name__}: {exc}")
            took = 1000 * (time.monotonic() - t0)
            if self.phase in ("load", "rest") and phase == self.phase:
                # Under load, not during a fault: a check of a database that does not answer
                # takes up to its check_timeout, as it should.
                self.report.ready_max_ms = max(self.report.ready_max_ms, took)
                if took > 1000:
                    self.problem(f"/health/ready took {took:.0f} ms under load ({phase})")
            await anyio.sleep(1.0)

    # ------------------------------------------------------------------ faults

    async def fault(self, name: str, rng: random.Random) -> None:
        self.report.faults[name] += 1
        self.phase = name
        end = time.monotonic() + self.fault_seconds
        if name == "kill-idle":
            while time.monotonic() < end:
                await anyio.to_thread.run_sync(self.kill_idle)
                await anyio.sleep(0.2)
        elif name == "cut":
            self.proxy.cut()
        elif name == "latency":
            self.proxy.latency(0.02)
            await anyio.sleep(self.fault_seconds)
            self.proxy.latency(0)
        elif name == "blackhole":
            self.proxy.blackhole()
            await anyio.sleep(min(self.fault_seconds, 2.0))
            self.proxy.restore()
        elif name == "restart":
            await anyio.to_thread.run_sync(self.pg.restart)
        elif name == "disconnects":
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(self.leave_mid_query, self.http, rng)
        await anyio.sleep(max(0.0, end - time.monotonic()))

    def kill_idle(self) -> None:
        self.pg.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND state = 'idle'",
            (self.app_name,),
        )

    # ------------------------------------------------------------------ at rest

    async def at_rest(self, http: httpx.AsyncClient, after: str) -> Rest:
        """Pause the load and read the server once everything has settled (up to 10 s).

        The load's client is closed first, and a new one made for the next round: the
        server's file descriptors then count no keep-alive connection of the load."""
        self.running = anyio.Event()
        with anyio.fail_after(20):  # a request of the load ends within its 15 s timeout
            while self.active:
                await anyio.sleep(0.01)
        await self.http.aclose()
        self.http = self.load_client()
        await anyio.sleep(0.2)
        deadline = time.monotonic() + 10.0
        while True:
            probe = (await http.get("/_soak", params={"types": True})).json()
            rows = await anyio.to_thread.run_sync(self.pg.activity, self.app_name)
            busy = [r for r in rows if r["state"] != "idle"]
            in_use = {k: v for k, v in probe["in_use"].items() if v}
            pools_in_use = {k: p["in_use"] for k, p in probe["pools"].items() if p["in_use"]}
            if not (busy or in_use or pools_in_use or len(rows) > MAX_BACKENDS):
                break
            if time.monotonic() > deadline:
                self.problem(
                    f"not at rest 10 s after {after}: in use {in_use}, pools {pools_in_use}, "
                    f"server {[(r['state'], r['query'][:40]) for r in busy]}, "
                    f"{len(rows)} backends (at most {MAX_BACKENDS})"
                )
                break
            await anyio.sleep(0.1)
        if probe["leaks"]:
            self.problem(f"{probe['leaks']} leak(s) reported after {after}")
        opened = sum(p["open"] or 0 for p in probe["pools"].values())
        rest = Rest(
            after, probe["tasks"], probe["fds"] - opened, probe["rss_kib"], len(rows),
            probe["types"],
        )  # fmt: skip
        self.report.rests.append(rest)
        return rest

    # ------------------------------------------------------------------ the run

    async def run(self, seconds: float, seed: int) -> Report:
        rng = random.Random(seed)
        started = time.monotonic()
        self.http = self.load_client()
        probe_limits = httpx.Limits(max_connections=1)
        async with (
            httpx.AsyncClient(
                base_url=self.server.base_url, timeout=15.0, limits=probe_limits
            ) as probes,
            anyio.create_task_group() as tg,
        ):
            for i in range(CLIENTS):
                tg.start_soon(self.client, random.Random(seed * 1000 + i))
            tg.start_soon(self.readiness, probes)
            cycle: list[str] = []
            warm = True
            while True:
                if not cycle:
                    if not warm and time.monotonic() - started >= seconds:
                        break
                    if warm and self.report.faults.total() >= len(FAULTS):
                        warm = False
                        self.report.baseline = self.report.rests[-1]
                    cycle = rng.sample(FAULTS, len(FAULTS))
                self.running.set()
                await anyio.sleep(self.quiet_seconds)
                name = cycle.pop()
                await self.fault(name, rng)
                self.phase = f"recovery after {name}"
                await anyio.sleep(self.quiet_seconds)  # under load
                self.phase = "rest"
                await self.at_rest(probes, name)
                self.phase = "load"
            self.stopping = True
            self.running.set()
        await self.http.aclose()
        self.report.seconds = time.monotonic() - started
        self.compare()
        return self.report

    def compare(self) -> None:
        base, last = self.report.baseline, self.report.rests[-1]
        if base is None:
            self.problem("the run ended before a full warm-up cycle")
            return
        if abs(last.tasks - base.tasks) > 2:
            self.problem(f"asyncio tasks at rest: {base.tasks} after warm-up, {last.tasks} now")
        if abs(last.fds - base.fds) > 2:
            self.problem(f"file descriptors at rest: {base.fds} after warm-up, {last.fds} now")
        if last.rss_kib > base.rss_kib * 1.05:
            self.problem(f"RSS at rest: {base.rss_kib} KiB after warm-up, {last.rss_kib} KiB now")

    def finish(self) -> None:
        """SIGTERM: uvicorn drains and exits 0; nothing of the app is left on the server."""
        self.server.terminate()
        try:
            code = self.server.wait(30)
        except Exception as exc:  # noqa: BLE001 - reported, then the server is killed
            self.problem(f"uvicorn did not exit within 30 s of SIGTERM: {exc}")
            self.server.stop()
            code = None
        if code not in (0, -15, None):  # uvicorn re-raises the SIGTERM it handled cleanly
            self.problem(f"uvicorn exited {code} on SIGTERM")
        self.server.stop()  # closes its log
        left = self.pg.activity(self.app_name)
        if left:
            self.problem(f"{len(left)} backend(s) of the app left after it exited")
        log = self.server.output()
        for marker in LOG_MARKERS:
            if marker in log:
                i = log.index(marker)
                self.problem(f"server log has {marker!r}: ...{log[max(0, i - 300) : i + 1500]}")
        lost_at_commit = self.tracebacks(log)
        failed = sum(n for k, n in self.report.answers.items() if k.endswith(" 500"))
        self.report.answers["lost at commit (log)"] = lost_at_commit
        if failed > lost_at_commit:
            self.problem(
                f"{failed} answers were 500, and the log has {lost_at_commit} commits that "
                f"lost their connection"
            )
        self.proxy.stop()

    def tracebacks(self, log: str) -> int:
        """Check every traceback in *log* belongs to a failed commit that lost its connection
        (tether logs those with the traceback); return how many such commits there are."""
        lines = log.splitlines()
        headers: set[int] = set()
        for i, line in enumerate(lines):
            if not line.startswith("Traceback (most recent call last)"):
                continue
            j = i
            while j > 0 and not lines[j].startswith(("tether: ", "ERROR:", "WARNING:", "INFO:")):
                j -= 1
            header = lines[j]
            if header.startswith("tether: closing resource") and any(
                marker in header for marker in LOST_AT_COMMIT
            ):
                headers.add(j)
            elif header not in self.reported:
                self.reported.add(header)
                self.problem(f"server log has a traceback after: {header[:500]}")
        return len(headers)


def soak(pg: Postgres, tmp: Path, seconds: float, *, seed: int = 0, **timing: float) -> Report:
    """Run the soak against *pg* for about *seconds* after one warm-up cycle of every fault."""
    s = Soak(
        pg, tmp, fault_seconds=timing.get("fault_seconds", 3.0),
        quiet_seconds=timing.get("quiet_seconds", 2.0),
    )  # fmt: skip
    try:
        report = anyio.run(s.run, seconds, seed)
    finally:
        s.finish()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-seconds", type=float, default=3.0)
    parser.add_argument("--quiet-seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--log", type=Path, help="keep the server's log here")
    args = parser.parse_args(argv)
    with Postgres() as pg, tempfile.TemporaryDirectory(prefix="tether-soak-") as tmp:
        try:
            report = soak(
                pg, Path(tmp), args.minutes * 60, seed=args.seed,
                fault_seconds=args.fault_seconds, quiet_seconds=args.quiet_seconds,
            )  # fmt: skip
        finally:
            if args.log is not None:
                logs = sorted(Path(tmp).glob("uvicorn-*.log"))
                args.log.write_bytes(b"".join(p.read_bytes() for p in logs))
    print(report.summary())
    if args.json is not None:
        data: dict[str, Any] = {
            "seconds": report.seconds,
            "answers": dict(report.answers),
            "faults": dict(report.faults),
            "ready_max_ms": report.ready_max_ms,
            "baseline": vars(report.baseline) if report.baseline else None,
            "rests": [vars(r) for r in report.rests],
            "problems": report.problems,
        }
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
