"""Health checks: every resource's ``check``, run concurrently, each bounded in time."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import describe

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle
    from ._resource import Resource


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one resource's check."""

    name: str
    ok: bool
    latency: float  # seconds
    error: str | None = None
    #: What a passing check has to say (a pool busy with traffic: "busy: 10 of 10 ...").
    detail: str | None = None

    @property
    def status(self) -> str:
        """``"ok"`` or ``"failing"``, as the report's JSON says."""
        return "ok" if self.ok else "failing"


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Every check's result; ``ok`` when the app scope runs and every check passed.

    *state* is the Lifecycle's (``"running"``, ``"starting"``, ``"stopping"``...); outside
    ``"running"`` no check runs and each is failing. ``report[name]`` is the result of the
    resource named *name* (``KeyError`` if it has none).
    """

    state: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when *state* is ``"running"`` and every check passed."""
        return self.state == "running" and all(c.ok for c in self.checks)

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def as_dict(self, *, errors: bool = True) -> dict[str, Any]:
        """The report as JSON; without *errors*, each failing check's status only (no error
        or detail text: ``Lifecycle(expose_errors=False)``)."""
        return {
            "status": "ok" if self.ok else "unavailable",
            "state": self.state,
            "checks": {
                c.name: {
                    "status": c.status,
                    "latency_ms": round(c.latency * 1000, 3),
                    **({"error": c.error} if c.error and errors else {}),
                    **({"detail": c.detail} if c.detail and errors else {}),
                }
                for c in self.checks
            },
        }


#: What a failing check of a resource replaced by ``lc.override()`` adds to its error.
_OVERRIDDEN = (
    " (the resource is replaced by lc.override(), and its check ran on the stand-in: give "
    "the stand-in what the check calls, or override with None, which is not checked)"
)


async def _check_one(lc: Lifecycle, res: Resource[Any]) -> CheckResult:
    assert res.check is not None
    replaced = lc._overrides.get(res)
    if replaced is not None and replaced.check is None:  # lc.override(res, None)
        return CheckResult(res.name, True, 0.0, detail="replaced by None: not checked")
    result = await _run_check(lc, res)
    if replaced is not None and not result.ok and result.error is not None:
        return CheckResult(res.name, False, result.latency, result.error + _OVERRIDDEN)
    return result


async def _run_check(lc: Lifecycle, res: Resource[Any]) -> CheckResult:
    assert res.check is not None
    t0 = time.perf_counter()
    synchronous = False  # a sync check: no timeout can interrupt it
    bound = anyio.move_on_after(res.check_timeout)
    busy = ""  # a busy pool's note, while a connection outside it checks the server
    try:
        with bound:
            if res.scope == "app":
                value = lc._app_value(res)
                saturation = None if res in lc._overrides else res.saturation
                if saturation is not None and (verdict := saturation(value)):
                    # Every connection in use: the check would queue behind the traffic
                    # (and fail its timeout while the database answers everyone else).
                    ok, note = verdict
                    aside_check = res.aside_check
                    aside = None
                    if ok and aside_check is not None:
                        aside = aside_check(value, res.check_timeout)
                    if aside is not None:
                        # Nothing handed out for longer than the check's timeout: the
                        # server, checked on a connection of its own, outside the pool.
                        busy = note
                        await aside
                        note += "; the server answers a connection outside the pool"
                    latency = time.perf_counter() - t0
                    if ok:
                        return CheckResult(res.name, True, latency, detail=note)
                    return CheckResult(res.name, False, latency, note + _holders(lc, res))
                result = res.check(value)
                if inspect.isawaitable(result):
                    await result
                else:
                    synchronous = True
            else:
                async with lc.scope(f"health check of {res.name!r}") as unit:
                    result = res.check(await unit.get(res))
                    if inspect.isawaitable(result):
                        await result
    except Exception as exc:
        # A check's own error (a driver's TimeoutError too) says what failed; one that the
        # bound's cancellation turned into another error did not finish in time.
        if not bound.cancel_called:
            latency = time.perf_counter() - t0
            if busy:
                error = _aside_failed(busy, f"failed: {describe(exc)}")
                return CheckResult(res.name, False, latency, error + _holders(lc, res))
            return CheckResult(res.name, False, latency, describe(exc))
    latency = time.perf_counter() - t0
    if bound.cancel_called:
        if busy:
            error = _aside_failed(busy, f"got no answer within {res.check_timeout:g} s")
            return CheckResult(res.name, False, latency, error + _holders(lc, res))
        late = f" ({res.check_late})" if res.check_late else ""
        error = f"check did not finish within {res.check_timeout:g} s{late}"
        return CheckResult(res.name, False, latency, error)
    if synchronous and latency > res.check_timeout:
        # A check that blocked the event loop (a sync call): no timeout can interrupt it.
        return CheckResult(
            res.name,
            False,
            latency,
            f"check took {latency:.2f} s, longer than check_timeout={res.check_timeout:g} s, "
            f"blocking the event loop meanwhile: make it async (or run it in a thread)",
        )
    return CheckResult(res.name, True, latency)


def _aside_failed(busy: str, what: str) -> str:
    """A busy pool's failing readiness: the server, checked outside the pool, did not answer."""
    return (
        f"the server stopped answering: a connection of the check's own, outside the pool, "
        f"{what} ({busy.removeprefix('busy: ')})"
    )


def _holders(lc: Lifecycle, res: Resource[Any]) -> str:
    """Which units of work hold a value made from *res* (a connection of a saturated pool),
    by route or label, most first, and for how long the oldest has: what holds the pool may
    wait on something else (another service), the database idle (trial 14). On the
    failure path only."""
    counts: dict[str, int] = {}
    oldest = None
    for unit in lc._in_flight():
        if any(res in entry.res.deps for entry in list(unit.entries)):
            counts[unit.label] = counts.get(unit.label, 0) + 1
            oldest = unit.started if oldest is None else min(oldest, unit.started)
    if oldest is None:
        return ""
    total = sum(counts.values())
    top = sorted(counts.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{n} {label}" for label, n in top[:3])
    more = f", {total - sum(n for _, n in top[:3])} other" if len(top) > 3 else ""
    return (
        f"; held by {total} unit{'s' if total != 1 else ''} of work ({shown}{more}), the "
        f"oldest for {time.perf_counter() - oldest:.1f} s: what they wait on may be another "
        f"service"
    )


async def run_checks(lc: Lifecycle) -> HealthReport:
    """Run every check concurrently; a check raising or timing out is failing."""
    checked = [r for r in lc._resources.values() if r.check is not None]
    results: list[CheckResult | None] = [None] * len(checked)
    state = "stopping" if lc._stopping else lc.state.value  # stopping: SIGTERM, drain_delay
    if state != "running":
        return HealthReport(
            state, [CheckResult(r.name, False, 0.0, f"app is {state}") for r in checked]
        )

    # An app resource that is down (required=False) fails the report, check= or not.
    down = [(r, e) for r in lc._slot_of if (e := lc._down(r)) is not None]
    unchecked = [CheckResult(r.name, False, 0.0, str(e)) for r, e in down if r.check is None]

    async def one(i: int, res: Resource[Any]) -> None:
        results[i] = await _check_one(lc, res)

    async with anyio.create_task_group() as tg:
        for i, res in enumerate(checked):
            tg.start_soon(one, i, res)
    # SIGTERM may have come while the checks ran (drain_delay): the report says so.
    state = "stopping" if lc._stopping else lc.state.value
    return HealthReport(state, [r for r in results if r is not None] + unchecked)
