"""In-process scenarios: each variant in its own worker process (pinned to the server CPU), driven
by the ASGI driver at concurrency 1, in many short cells interleaved across variants.

A round runs one cell of every (route, variant), the variants' order rotated each round, so the
machine's speed drifts (about 2x, in phases of 0.1-1 s) land on every variant alike. Per cell:
process CPU time / requests and wall time / requests.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import procs


class WorkerError(RuntimeError):
    pass


class WorkerProc:
    """A ``bench.worker`` subprocess and its line protocol."""

    def __init__(self, variant: str, routes: list[str], env: dict[str, str], log: Path) -> None:
        self.variant = variant
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            procs.pinned(procs.SERVER_CPU, procs.python("-m", "bench.worker", variant, *routes)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=procs.ROOT,
            preexec_fn=procs.die_with_parent,
        )
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = b""

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"{self.variant}: no answer within {timeout:.0f} s")
            if not self._sel.select(left):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise WorkerError(f"{self.variant}: worker exited (see {self._log.name})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, timeout: float = 120.0, **msg: Any) -> dict[str, Any]:
        msg["timeout"] = timeout
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        answer = self.read(timeout + 10)
        if not answer.get("ok"):
            raise WorkerError(f"{self.variant}: {answer.get('reason')}")
        return answer

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        procs.stop(self.proc)
        self._sel.close()
        self._log.close()


def start_workers(
    variants: list[str], routes: list[str], env: dict[str, str], logdir: Path
) -> tuple[dict[str, WorkerProc], dict[str, str], dict[str, dict[str, str]]]:
    """Starts one worker per variant; returns the live ones, the skipped ones with why, and
    the problems each live one has with a route (empty string: none)."""
    live: dict[str, WorkerProc] = {}
    skipped: dict[str, str] = {}
    problems: dict[str, dict[str, str]] = {}
    for v in variants:
        w = WorkerProc(v, routes, env, logdir / f"worker-{v}.log")
        try:
            hello = w.read(60)
        except WorkerError as exc:
            hello = {"ok": False, "reason": str(exc)}
        if not hello.get("ok"):
            skipped[v] = hello.get("reason", "?")
            w.close()
            continue
        live[v] = w
        problems[v] = hello["routes"]
    return live, skipped, problems


def run(
    variants: list[str],
    routes: list[str],
    env: dict[str, str],
    logdir: Path,
    *,
    cell_seconds: float,
    budget_seconds: float,
    min_rounds: int,
    max_rounds: int,
    others: procs.Others | None = None,
    log: Any = print,
) -> dict[str, Any]:
    t_start = time.monotonic()
    others = others or procs.Others()
    live, skipped, problems = start_workers(variants, routes, env, logdir)
    for v, why in skipped.items():
        log(f"  skip {v}: {why}")
    for v, per_route in problems.items():
        for r, why in per_route.items():
            if why:
                log(f"  skip {v} {r}: {why}")
    cells = [(r, v) for r in routes for v in live if not problems[v][r]]
    counts: dict[tuple[str, str], int] = {}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {v: {} for v in live}
    try:
        # warm up, then size each cell to about cell_seconds of wall time
        for r, v in cells:
            live[v].call(cmd="cell", route=r, n=50)
            probe = live[v].call(cmd="cell", route=r, n=100)
            per_req = max(probe["wall"] / probe["n"], 1e-6)
            counts[(r, v)] = int(min(max(cell_seconds / per_req, 20), 20000))
        setup = time.monotonic() - t_start
        log(f"  {len(live)} workers ready, cells sized in {setup:.1f} s")

        rounds = 0
        t_rounds = time.monotonic()
        variant_order = list(live)
        while rounds < max_rounds:
            elapsed = time.monotonic() - t_rounds
            per_round = elapsed / rounds if rounds else 0.0
            if rounds >= min_rounds and elapsed + per_round > budget_seconds:
                break
            shift = rounds % len(variant_order)
            order = variant_order[shift:] + variant_order[:shift]
            before = others.look()
            for r in routes:
                for v in order:
                    if (r, v) not in counts:
                        continue
                    res = live[v].call(cmd="cell", route=r, n=counts[(r, v)])
                    after = others.look()
                    samples[v].setdefault(r, []).append(
                        {
                            "round": rounds,
                            "n": res["n"],
                            "cpu_us": res["cpu"] / res["n"] * 1e6,
                            "wall_us": res["wall"] / res["n"] * 1e6,
                            "errors": res["errors"],
                            "others": procs.Others.load(before, after),
                        }
                    )
                    if samples[v][r][-1]["others"] > procs.DISTURBED:
                        samples[v][r][-1]["others_busiest"] = procs.Others.busiest(before, after)
                    before = after
            rounds += 1
        log(f"  {rounds} rounds in {time.monotonic() - t_rounds:.1f} s")
    finally:
        for w in live.values():
            w.close()
    return {
        "skipped": skipped,
        "route_problems": {v: {r: p for r, p in pr.items() if p} for v, pr in problems.items()},
        "cell_requests": {f"{v} {r}": n for (r, v), n in counts.items()},
        "rounds": rounds,
        "samples": samples,
    }


def single_worker(
    variant: str, route: str, env: dict[str, str], logdir: Path
) -> tuple[WorkerProc | None, str]:
    """One worker for the memory and profile scenarios; None and why if it cannot run."""
    live, skipped, problems = start_workers([variant], [route], env, logdir)
    if variant in skipped:
        return None, skipped[variant]
    if problems[variant][route]:
        live[variant].close()
        return None, problems[variant][route]
    return live[variant], ""
