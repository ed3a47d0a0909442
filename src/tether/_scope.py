"""Units of work: lazy open, at most once; reverse close, exactly once, shielded and bounded.

The same opener and closer serve the app scope (``_lifecycle``) and request scopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import faulthandler
import gc
import importlib.util
import inspect
import logging
import os
import re
import sys
import sysconfig
import tempfile
import threading
import time
import types
import weakref
from collections.abc import Callable, Generator
from functools import partial
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._errors import (
    ClientDisconnected,
    FailedResponse,
    ResourceClosedError,
    ResourceUnavailable,
    ScopeError,
    describe,
    for_good,
)
from ._resource import _MISSING, OPENING, Kind, Resource

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle
    from ._stats import Counters

T = TypeVar("T")

log = logging.getLogger("tether")
_now = time.perf_counter


# Frames skipped in an acquirer's stack. tether's own by its real directory, not "/tether/":
# a checkout or a project named "tether" (as on CI) would otherwise hide the user's frames.
# Then the frameworks, and the servers and command-line runners around an app (a job's
# `lc.scope()` under `python -m uvicorn` had ten of theirs before its one frame).
def code_of(*names: str) -> tuple[str, ...]:
    """Where the code of the modules *names* lies: a package's directories (with a trailing
    separator), a module's file; found without importing them (those not installed: none).
    Matched as prefixes of a frame's file: a user's checkout under a directory that happens
    to be named "fastapi" or "asyncio" is not taken for theirs."""
    found: list[str] = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # pragma: no cover - a broken install
            continue
        if spec is None:
            continue
        if spec.submodule_search_locations:
            found.extend(os.path.join(d, "") for d in spec.submodule_search_locations)
        elif spec.origin and os.path.isabs(spec.origin):
            found.append(spec.origin)
    return tuple(found)


_TETHER_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    *code_of(
        "anyio",
        "asyncio",
        "trio",
        "outcome",
        "contextlib",
        "starlette",
        "fastapi",
        "uvicorn",
        "hypercorn",
        "gunicorn",
        "granian",
        "daphne",
        "twisted",
        "click",
        "runpy",
        # A worker process a server spawned (`uvicorn --workers N`, granian):
        # multiprocessing's bootstrap, under the `<string>` of `python -c`.
        "multiprocessing",
    ),
    "<frozen runpy>",
    "<string>",
)


class Entry:
    """One opened value in a scope, with what is needed to close it."""

    __slots__ = ("handle", "late", "leak_reported", "opened_at", "res", "stack", "unit", "value")

    def __init__(
        self,
        res: Resource[Any],
        handle: Any,
        value: Any,
        stack: Any,
        opened_at: float,
        unit: Unit | None = None,
    ) -> None:
        self.res = res
        self.handle = handle
        self.value = value
        self.opened_at = opened_at
        self.late = res.late
        # The label of the unit that held it once reported as a leak (None: not reported;
        # a label may be "").
        self.leak_reported: str | None = None
        self.stack = stack
        # The unit of work that holds it (None: an app value), for a leak seen at its close
        # (`_leak_at_close`). No cycle outlives the close: the unit's list drops the entry.
        self.unit = unit


# --------------------------------------------------------------------------- opening


async def open_value(
    lc: Lifecycle, res: Resource[T], args: list[Any], *, limiter: Any = None
) -> tuple[T, Any]:
    """Run *res*'s factory with *args*; return ``(value, handle)``, handle is for closing."""
    factory = res.call
    kind = res.kind
    if res.timeout is None:
        return await _open(lc, res, factory, kind, args, limiter, None)
    deadline = anyio.current_time() + res.timeout
    try:
        # An anyio scope, which the factory's own shields hold off (an asyncio timeout
        # cancelled inside them: trial 28). A generator that enters a task group before its
        # value and keeps it across its yield cannot take timeout= (documented).
        with anyio.CancelScope(deadline=deadline):
            return await _open(lc, res, factory, kind, args, limiter, deadline)
        raise TimeoutError  # the deadline cancelled the open (a token's wait, or async code)
    except TimeoutError:
        # Counted in the resource's `timeouts` by whoever counts the failed open (as a
        # pool's wait that runs out in the factory): `count_open_failure`, or the app scope.
        msg = (
            f"Resource {res.name!r} did not open within {res.timeout:g} s (its timeout=). "
            f"Check that its backend is reachable and not saturated, or raise the timeout."
        )
        raise ResourceUnavailable(
            msg, resource=res.name, retry_after=res.retry_after, timed_out=True
        ) from None


async def _open(
    lc: Lifecycle,
    res: Resource[Any],
    factory: Callable[..., Any],
    kind: Kind,
    args: list[Any],
    limiter: Any,
    deadline: float | None,
) -> tuple[Any, Any]:
    if kind is Kind.ASYNC_GEN:
        agen = factory(*args)
        try:
            value = await agen.__anext__()
        except StopAsyncIteration:
            raise no_value(res) from None
        return value, agen
    if kind is Kind.ASYNC_FUNC:
        return await factory(*args), None
    if kind is Kind.ASYNC_CM:
        cm = factory(*args)
        try:
            return await cm.__aenter__(), cm
        except RuntimeError as exc:
            error = _cm_no_value(res, cm, exc)
            if error is None:
                raise
            raise error from None
    if kind is Kind.SYNC_FUNC:
        if res.thread:
            fn = partial(factory, *args)
            value = await _in_thread(lc, res, fn, limiter, deadline, pair=False)
        else:
            value = factory(*args)
        if type(value) is CoroutineType:
            raise coroutine_value(res, value)
        return value, None
    if kind is Kind.SYNC_GEN:

        def enter_gen() -> tuple[Any, Any]:
            gen = factory(*args)
            try:
                return next(gen), gen
            except StopIteration:
                raise no_value(res) from None

        if res.thread:
            return await _in_thread(lc, res, enter_gen, limiter, deadline)
        return enter_gen()

    def enter_cm() -> tuple[Any, Any]:
        cm = factory(*args)
        try:
            return cm.__enter__(), cm
        except RuntimeError as exc:
            error = _cm_no_value(res, cm, exc)
            if error is None:
                raise
            raise error from None

    if res.thread:
        return await _in_thread(lc, res, enter_cm, limiter, deadline)
    return enter_cm()


async def _in_thread(
    lc: Lifecycle,
    res: Resource[Any],
    fn: Callable[[], T],
    limiter: Any,
    deadline: float | None,
    *,
    pair: bool = True,
) -> T:
    # Opening holds a token of the resource's own limiter (sized from its pool), never
    # one of the threadpool endpoints run in: a sync pool smaller than the threadpool
    # cannot deadlock it. The thread is not abandoned on cancellation, so a value that
    # was opened is always known, and closed.
    tokens = limiter or res.limiter or lc._open_limiter
    stop = OPEN_STOP.get()  # an app resource's open: the app scope may stop waiting for it
    if stop is not None and stop.over:  # a task the open started, running on after it
        stop = None
    if deadline is not None or stop is not None:
        return await _in_thread_until(lc, res, fn, tokens, deadline, pair, stop)
    if limiter is None:
        wait = lc._token_waits.get(res) if lc._token_waits else None
        if wait is not None:
            return await _in_thread_waited(lc, res, fn, tokens, wait)
    if asyncio._get_running_loop() is None:
        return await anyio.to_thread.run_sync(fn, limiter=tokens)  # anyio shields the wait
    # On asyncio a one-shot `task.cancel()` cancels the future of the thread, anyio's
    # shield notwithstanding, and what the thread opens would be lost: so the wait for
    # the thread is shielded natively (the cancellation is delivered once it is over).
    # Waiting for a token is not: nothing is open yet.
    async with tokens:
        with anyio.CancelScope(shield=True):
            run = anyio.to_thread.run_sync(fn, limiter=lc._thread_runner)
            value: T = await _drive(lc, res, run, bounded=False)
    return value


class TokenTicket(Protocol):
    """A unit of work's wait for a token of a sync resource's limiter (`TokenWait`)."""

    @property
    def within(self) -> float | None:
        """Seconds the unit may wait for the token (None: no bound)."""

    def timed_out(self) -> BaseException:
        """What the open raises when the token did not come within `within` seconds."""

    def leave(self) -> None:
        """The open is over (opened, failed, cancelled): called once, in the same task."""


# Set by an integration whose sync resource's limiter stands in front of a pool of its own
# (SQLAlchemy's sync sessions: `concurrency=` its size): called on the event loop before an
# open waits for a token, it counts the unit waiting for the pool, or refuses it (raises),
# and bounds that wait as the pool bounds its own. Kept per Lifecycle, by resource
# (`set_token_wait`); a resource without one (what users write) waits as it always did.
TokenWait = Callable[[], TokenTicket]


def set_token_wait(res: Resource[Any], wait: TokenWait) -> None:
    """Make the opens in a thread of *res* wait for their token through *wait*."""
    res.lifecycle._token_waits[res] = wait


async def _in_thread_waited(
    lc: Lifecycle,
    res: Resource[Any],
    fn: Callable[[], T],
    tokens: Any,
    wait: TokenWait,
) -> T:
    """`_in_thread` for a resource with a `TokenWait`: the wait for the token is the wait
    for the resource's pool, counted there and bounded by its timeout; the thread then runs
    as in `_in_thread`, on the token taken."""
    ticket = wait()  # counts the unit waiting, or refuses it
    try:
        try:
            with anyio.fail_after(ticket.within):
                await tokens.acquire()  # not shielded: nothing is open yet
        except TimeoutError:
            raise ticket.timed_out() from None
        try:
            run = anyio.to_thread.run_sync(fn, limiter=lc._thread_runner)
            if asyncio._get_running_loop() is None:
                return await run  # anyio shields the wait
            with anyio.CancelScope(shield=True):  # as in `_in_thread`
                value: T = await _drive(lc, res, run, bounded=False)
            return value
        finally:
            tokens.release()
    finally:
        ticket.leave()


class OpenStop:
    """Set (`OPEN_STOP`) in the task that opens an app resource: when the app scope stops
    the open and it is still running in a thread past ``close_timeout``, `fire` ends the
    wait for the thread, which is left to finish and closes what it opens (`_Handoff`)."""

    __slots__ = ("fired", "over", "res", "wakers")

    def __init__(self, res: Resource[Any] | None = None) -> None:
        self.res = res  # the app resource opening (what asks, for `_app_value`'s message)
        self.fired = False
        self.over = False  # the open is over (tasks it started keep the variable)
        self.wakers: set[Callable[[], Any]] = set()

    def fire(self) -> None:
        self.fired = True
        for wake in list(self.wakers):
            wake()


OPEN_STOP: contextvars.ContextVar[OpenStop | None] = contextvars.ContextVar(
    "tether_open_stop", default=None
)


class _Stopped(Exception):
    """The app scope stopped waiting for an open in a thread (`OpenStop.fire`)."""


async def _in_thread_until(
    lc: Lifecycle,
    res: Resource[Any],
    fn: Callable[[], T],
    tokens: Any,
    deadline: float | None,
    pair: bool,
    stop: OpenStop | None = None,
) -> T:
    """`_in_thread` for a resource with a ``timeout=``: the wait ends at the deadline; for
    an app resource's open (*stop*), also when the app scope gives up on it.

    A thread cannot be interrupted, so past the deadline it is left to finish: what it
    opens then is closed in that thread (`_Handoff`), and the limiter's token stays
    taken until it ends, so a backend that hangs holds as many threads as the limiter
    allows, no more. The wait is shielded from cancellation as in `_in_thread`. An app
    resource's open runs in a daemon thread of its own: one left to finish (a connect
    that hangs) does not hold the process at exit, as a worker thread of anyio's would.
    """
    loop = asyncio._get_running_loop()
    if loop is not None:
        soon: Callable[..., Any] = loop.call_soon_threadsafe
    else:  # trio: anyio's other backend
        import trio

        soon = trio.lowlevel.current_trio_token().run_sync_soon
    handoff = _Handoff(res, partial(soon, tokens.release_on_behalf_of), pair)
    await tokens.acquire_on_behalf_of(handoff)  # cancelled by the deadline: nothing open yet
    limit = None if deadline is None else deadline - anyio.current_time()
    try:
        if stop is not None:
            run = _in_daemon_thread(handoff, fn, soon, stop)
        else:
            run = anyio.to_thread.run_sync(
                handoff.run, fn, limiter=lc._thread_runner, abandon_on_cancel=True
            )
        if loop is not None:
            with anyio.CancelScope(shield=True):
                return await _drive(  # type: ignore[no-any-return]
                    lc, res, run, bounded=False, limit=limit
                )
        with anyio.CancelScope(shield=True), anyio.move_on_after(limit):
            return await run  # type: ignore[no-any-return]
        raise TimeoutError
    except TimeoutError:
        if handoff.abandon():
            raise  # the thread closes what it opens, and gives the token back
        value: T = handoff.outcome()  # it finished as the deadline passed: the value is here
        return value
    except _Stopped:
        # The app scope cancelled this open before it gave up on it: delivered now.
        await anyio.lowlevel.checkpoint()
        raise TimeoutError(f"opening resource {res.name!r} was abandoned") from None
    finally:
        if not handoff.abandoned:
            tokens.release_on_behalf_of(handoff)


async def _in_daemon_thread(
    handoff: _Handoff, fn: Callable[[], Any], soon: Callable[..., Any], stop: OpenStop
) -> Any:
    """Run *fn* through *handoff* in a daemon thread; wait until it ends or *stop* fires
    (then raise `_Stopped`, the thread left to close what it opens)."""
    done = anyio.Event()

    def work() -> None:
        try:
            handoff.run(fn)
        except BaseException:  # kept by the handoff: `outcome()` raises it
            pass
        finally:
            try:
                soon(done.set)
            except RuntimeError:  # the event loop is gone
                pass

    context = contextvars.copy_context()  # as anyio's worker threads run it
    name = f"tether: opening {handoff.res.name}"
    threading.Thread(target=context.run, args=(work,), name=name, daemon=True).start()
    stop.wakers.add(done.set)
    try:
        await done.wait()
    finally:
        stop.wakers.discard(done.set)
    if stop.fired and handoff.abandon("the app stopped waiting for it"):
        raise _Stopped
    return handoff.outcome()


class _Handoff:
    """What a thread opens for a task that may stop waiting for it (`_in_thread_until`):
    handed to the task while it waits, else closed in the thread, which then gives back
    the limiter's token (*release*, called from the thread). *pair*: the thread returns
    ``(value, handle)``, the handle to close; else a plain function's value."""

    __slots__ = ("abandoned", "done", "error", "lock", "pair", "release", "res", "result", "why")

    def __init__(self, res: Resource[Any], release: Callable[[Any], Any], pair: bool) -> None:
        self.res = res
        self.release = release
        self.pair = pair
        self.lock = threading.Lock()
        self.abandoned = False
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.why = ""

    def run(self, fn: Callable[[], Any]) -> Any:
        """In the thread."""
        try:
            result: Any = fn()
            error = None
        except BaseException as exc:  # handed over, or logged below
            result, error = None, exc
        with self.lock:
            if not self.abandoned:
                self.done = True
                self.result, self.error = result, error
                return self.outcome()
        res = self.res
        after = self.why or f"its timeout={res.timeout:g} s"
        try:
            if error is None and self.pair:
                _close_sync(res, result[1], None)  # a generator's or context manager's
            elif error is not None:
                log.warning(
                    "tether: resource %r failed to open after %s: %s",
                    res.name,
                    after,
                    describe(error),
                    extra={"tether_resource": res.name},
                )
        except Exception as exc:  # nobody is left to raise it to
            log.warning(
                "tether: resource %r opened after %s; closing it failed: %s",
                res.name,
                after,
                describe(exc),
                extra={"tether_resource": res.name},
            )
        finally:
            try:
                self.release(self)
            except RuntimeError:  # the event loop is gone, and its limiter with it
                pass
        return None

    def abandon(self, why: str = "") -> bool:
        """The task stops waiting (*why*, past its timeout if not given); False if the
        thread has finished already."""
        with self.lock:
            if self.done:
                return False
            self.why = why
            self.abandoned = True
            return True

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


# --------------------------------------------------------------------------- closing


class _Shielded:
    """Await the rest of a cleanup that was stepped once, shielded from cancellation.

    asyncio only. A cancellation (``task.cancel()``, which is also how anyio delivers
    one) cancels the future the task waits on. So the task never waits on the cleanup's
    own future but on this object, which stands in for that future and refuses to be
    cancelled: the task registers its wake-up on the real future (``add_done_callback``),
    so it resumes as soon as the cleanup's future completes, in the same loop iteration as
    without a shield; ``task.cancel()`` calls ``cancel()`` on what the task waits on, which
    refuses, so asyncio marks the task to be cancelled at its next step, when the cleanup's
    future is done. The cleanup keeps waiting on its real future undisturbed, and the
    cancellation is delivered again once the cleanup is over. Only a timeout the cleanup
    started itself (an anyio scope it entered, or an ``asyncio.timeout``: see
    `_entered_by`) cancels the future, and is raised in the cleanup. Past ``close_timeout`` the
    cleanup's future is cancelled (as a deadline would), and the close reports a timeout.
    No task, no cancel scope and no extra loop iteration are spent: on a request's fresh
    task a task or a cancel scope costs more than the cleanup itself when it is a pool
    release.

    With an *entry* (`_ClosingStep`), the cleanup is a generator's cleanup step and the
    value's bookkeeping follows, in the same generator.
    """

    __slots__ = (
        "_asyncio_future_blocking",
        "_loop",
        "add_done_callback",
        "bounded",
        "coro",
        "deadline",
        "entry",
        "exc",
        "first",
        "fut",
        "given_up",
        "lc",
        "limit",
        "own",
        "res",
        "salvage",
        "timed_out",
    )

    def __init__(
        self,
        lc: Lifecycle,
        res: Resource[Any],
        coro: Any,
        first: Any,
        *,
        bounded: bool = True,
        limit: float | None = None,
    ) -> None:
        self.lc = lc
        self.res = res
        self.coro = coro
        self.first = first
        self.fut: asyncio.Future[Any] | None = None
        self.timed_out = False
        self.given_up = False  # past the deadline and its salvage: every wait cancelled
        self.salvage: asyncio.TimerHandle | None = None
        self.own = False  # the future was cancelled by the cleanup's own asyncio timeout
        self.deadline = 0.0
        self.bounded = bounded  # by close_timeout (a cleanup); an open has its own timeout=
        self.limit = limit  # an open's: seconds left of its timeout=, if it has one
        self.entry: Entry | None = None
        self.exc: BaseException | None = None
        self._asyncio_future_blocking = False

    def expire(self) -> None:
        """Past the deadline (called by a timer, or by the lifecycle's sweeper).

        A cleanup's first expiry cancels what it waits on (a ``COMMIT`` waiting for a lock,
        say) and gives it `SALVAGE` more seconds to end in a known state: its driver asks
        the server to cancel the statement, and the integration rolls back or terminates
        the connection, and its backend (each wait of that salvage was cancelled at once
        before, so a ``COMMIT`` abandoned this way went on on the server, committed after
        the client's 500, and outlived the process). The second expiry, or an open's
        first, gives up: every wait is cancelled as it comes."""
        fut = self.fut
        if self.timed_out or not self.bounded:
            self.timed_out = self.given_up = True
        else:
            self.timed_out = True
            self.deadline = _now() + SALVAGE  # the sweeper's next expiry, if it runs
            # The sweeper expires only the closes it was given as they began: one that began
            # on a timer, before the sweeper's first run, was never given up (trial 24).
            lc = self.lc
            if not (lc._sweeping and self in lc._slow_closes):
                self.salvage = asyncio.get_running_loop().call_later(SALVAGE, self.expire)
        if fut is not None and fut not in _TO_THE_END:
            fut.cancel()

    # What the task waiting on the cleanup uses: the future it stands in for, but for
    # `cancel`. `_loop` and `add_done_callback` are the real future's, set as attributes
    # while the task waits: asyncio's task reads `_loop` where there is no `get_loop`
    # method, and calls the future's own `add_done_callback`: no call into Python for either.
    _loop: asyncio.AbstractEventLoop
    add_done_callback: Any

    def remove_done_callback(self, fn: Any) -> int:
        return self.fut.remove_done_callback(fn) if self.fut is not None else 0

    def cancel(self, msg: Any = None) -> bool:
        fut = self.fut
        if fut is not None:
            if _by_anyio_scope(msg):
                # A scope the cleanup entered itself (see `__await__`): its own timeout.
                return fut.cancel(msg)
            # `task.cancel()` is C: the frame that called it is the canceller's.
            timeout = _expiring_timeout(sys._getframe(1))
            if timeout is not None and _entered_by(self.coro, timeout):
                # An `asyncio.timeout` (or `wait_for`) the cleanup entered: its own too.
                self.own = True
                return fut.cancel(msg)
        return False  # shielded: the task is cancelled once the cleanup is over

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return self.fut is None or self.fut.done()

    def result(self) -> Any:
        return self.fut.result() if self.fut is not None else None

    def __repr__(self) -> str:
        return f"<tether shielded cleanup waiting on {self.fut!r}>"

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        yielded = self.first
        lc = self.lc
        entry = self.entry
        # The running lifecycle's sweeper enforces deadlines; without it, a timer does.
        timer = None
        if self.bounded:
            self.deadline = _now() + lc.close_timeout
            if lc._sweeping:
                lc._slow_closes.add(self)
            else:
                timer = asyncio.get_running_loop().call_later(lc.close_timeout, self.expire)
        elif self.limit is not None:
            timer = asyncio.get_running_loop().call_later(self.limit, self.expire)
        swallowed = 0
        message = None
        result: Any = None
        try:
            try:
                while True:
                    step: Any = None
                    thrown: BaseException | None = None
                    if isinstance(yielded, asyncio.Future) and yielded._asyncio_future_blocking:
                        fut = yielded
                        fut._asyncio_future_blocking = False
                        if self.given_up and fut not in _TO_THE_END:
                            fut.cancel()
                        if not fut.done():
                            self.fut = fut
                            self._loop = fut.get_loop()
                            self.add_done_callback = fut.add_done_callback
                            self._asyncio_future_blocking = True
                            try:
                                yield self
                            except asyncio.CancelledError as cancel:
                                # Delivered now that the future is done. The deadline's own
                                # cancellation of the future: the cleanup reads it from the
                                # result. A one-shot cancellation: held back, delivered
                                # again after. An anyio scope's: see below.
                                if fut.cancelled() and self.timed_out:
                                    pass
                                elif not fut.cancelled() and fut.exception() is cancel:
                                    # The future's own result: the cleanup ended with a
                                    # CancelledError (a sync cleanup in a thread re-raising
                                    # the unit's, thrown in), no cancellation of the task.
                                    thrown = cancel
                                elif self.own:
                                    self.own = False
                                    thrown = cancel
                                elif _native(cancel):
                                    swallowed += 1
                                    message = cancel.args[0] if cancel.args else None
                                else:
                                    thrown = cancel
                            except BaseException:
                                pass
                            self.fut = None
                    else:
                        # A bare `yield` (sleep(0)) or something not asyncio's: pass it on.
                        try:
                            step = yield yielded
                        except asyncio.CancelledError as cancel:
                            if _native(cancel):
                                swallowed += 1
                                message = cancel.args[0] if cancel.args else None
                            else:
                                thrown = cancel
                    # An anyio scope's cancellation can only come from a scope the cleanup
                    # entered itself (a task inside an anyio scope closes under an anyio
                    # shield): it is the cleanup's own, and raised in it, as anyio would.
                    # (Held back at an anyio checkpoint, `checkpoint_if_cancelled` would
                    # loop forever.)
                    try:
                        yielded = coro.send(step) if thrown is None else coro.throw(thrown)
                    except StopIteration as stop:
                        result = stop.value
                        if not self.bounded:
                            self.timed_out = False  # an open that finished: its value counts
                        break
                    except BaseException as failure:
                        if self.timed_out and isinstance(failure, asyncio.CancelledError):
                            break  # the cancellation made by the deadline: reported below
                        raise
            finally:
                if timer is not None:
                    timer.cancel()
                elif self.bounded:
                    lc._slow_closes.discard(self)
                if self.salvage is not None:
                    self.salvage.cancel()
                if swallowed:
                    _deliver_again(swallowed, message)
            if self.timed_out:
                if not self.bounded:
                    raise TimeoutError  # an open past its timeout=: its opener says so
                _close_timed_out(lc, self.res)
        except StopAsyncIteration:
            if entry is None:
                raise
            _count_closed(lc, entry)  # the generator finished: closed
            return None
        except BaseException as failure:
            if entry is None:
                raise
            _count_closed(lc, entry, None if failure is self.exc else failure)
            if failure is self.exc:
                return None
            entry.res.counters.close_errors += 1
            raise
        if entry is not None:
            # The step ended with a value: the generator yielded a second time.
            return (yield from close_entry(lc, entry, self.exc, again=True).__await__())
        return result


try:  # which anyio cancel scope an asyncio task is in (anyio's own bookkeeping)
    from anyio._backends._asyncio import _task_states as _anyio_states

    _states: Any = _anyio_states
    _anyio_tasks: Any = _states.data  # the WeakKeyDictionary's own dict
except (ImportError, AttributeError):  # pragma: no cover - another anyio layout
    _anyio_tasks = None
_weakref = weakref.ref


def in_anyio_scope(task: Any = None) -> bool:
    """Whether the running asyncio task (*task*, if the caller has it) is inside an anyio
    cancel scope, so anyio may cancel it at every await. True when anyio's bookkeeping
    cannot be read."""
    if task is None:
        if asyncio._get_running_loop() is None:
            return False  # not asyncio (trio): every cleanup runs in an anyio shield there
        task = asyncio.current_task()
        if task is None:  # pragma: no cover
            return False
    if _anyio_tasks is None:  # pragma: no cover
        return True
    state = _anyio_tasks.get(_weakref(task))
    return state is not None and getattr(state, "cancel_scope", True) is not None


def anyio_cancellation(task: Any) -> str | None:
    """The message of the cancellation an anyio cancel scope is delivering to *task* (the
    innermost cancelled scope around it, not behind a shield), or None if no scope around it
    is cancelled. anyio cancels with it, and knows its own cancellations by it."""
    if _anyio_tasks is None:  # pragma: no cover
        return None
    state = _anyio_tasks.get(_weakref(task))
    scope = getattr(state, "cancel_scope", None)
    for _ in range(1000):  # scopes nest far less deep; stop on anything circular
        if scope is None:
            return None
        if getattr(scope, "_cancel_called", False):
            reason = getattr(scope, "_cancel_reason", None)  # anyio >= 4.11
            return reason if isinstance(reason, str) else f"Cancelled by cancel scope {id(scope):x}"
        if getattr(scope, "_shield", False):
            return None
        scope = getattr(scope, "_parent_scope", None)
    return None  # pragma: no cover


# How anyio marks the cancellations of its cancel scopes: "Cancelled via cancel scope <id>"
# since 4.11, "Cancelled by cancel scope <id>" before (and still at some checkpoints).
_ANYIO_MARKS = ("Cancelled via cancel scope ", "Cancelled by cancel scope ")


def _by_anyio_scope(reason: Any) -> bool:
    """Whether a cancellation's message is an anyio cancel scope's (anyio tells its own
    cancellations apart by the same mark)."""
    return isinstance(reason, str) and reason.startswith(_ANYIO_MARKS)


def _native(cancel: asyncio.CancelledError) -> bool:
    """Whether a cancellation is a one-shot ``task.cancel()``, not an anyio cancel scope's.

    A one-shot cancellation held back during a cleanup would be lost: tether delivers it
    again once the cleanup is over. An anyio scope's comes from a scope the cleanup
    entered itself, and is the cleanup's to handle.
    """
    return not _by_anyio_scope(cancel.args[0] if cancel.args else None)


_ON_TIMEOUT = asyncio.Timeout._on_timeout.__code__  # type: ignore[attr-defined]
_ASYNC_GEN_STEPS = ("async_generator_asend", "async_generator_athrow")


def _expiring_timeout(frame: Any) -> asyncio.Timeout | None:
    """The ``asyncio.Timeout`` whose deadline is cancelling the task, if *frame* is its."""
    if frame is None or frame.f_code is not _ON_TIMEOUT:
        return None
    timeout = frame.f_locals.get("self")
    return timeout if isinstance(timeout, asyncio.Timeout) else None


def _entered_by(coro: Any, timeout: asyncio.Timeout) -> bool:
    """Whether *timeout* was entered by the cleanup *coro*, or by what it awaits.

    An ``async with`` keeps its context manager's ``__aexit__`` on the stack of the frame
    that entered it until it exits, and a suspended coroutine's frame stack is part of
    what the garbage collector sees of it (``gc.get_referents``). So the await chain from
    *coro* down is walked, frame by frame. Runs only when a timeout cancels a task that
    waits in a cleanup: no cost on any other path. (A timeout entered outside the cleanup,
    around the unit of work, is not on the chain: held back.)
    """
    aw = coro
    for _ in range(64):  # an await chain is never this deep; stop on anything circular
        if aw is None:
            return False
        gen = None
        for ref in gc.get_referents(aw):
            if ref is timeout or _bound_to(ref) is timeout:
                return True
            if gen is None and isinstance(ref, types.AsyncGeneratorType):
                gen = ref
        nxt = getattr(aw, "cr_await", None) or getattr(aw, "ag_await", None)
        if nxt is None:
            nxt = getattr(aw, "gi_yieldfrom", None)
        if nxt is None and type(aw).__name__ in _ASYNC_GEN_STEPS:
            nxt = gen  # an `__anext__()`/`athrow()` step: its generator
        aw = nxt
    return False


def _bound_to(ref: Any) -> Any:
    """*ref*'s ``__self__`` (a bound method's object), or None; an object whose
    ``__getattr__`` raises something else (a proxy of a value closed with its unit of work)
    is no method."""
    try:
        return getattr(ref, "__self__", None)
    except Exception:
        return None


def _deliver_again(swallowed: int, message: Any) -> None:
    """Deliver one-shot cancellations that a shielded cleanup held back, once, for the
    task's next await (an anyio cancel scope's are not counted: see `_native`)."""
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - a cleanup always runs in a task
        return
    for _ in range(swallowed):
        task.uncancel()
    task.cancel(message)


class _ClosingStep(_Shielded):
    """The rest of a generator's cleanup step (`start_close` ran it until it waited).

    Shielded and bounded like any cleanup, then the value's bookkeeping (`_Shielded`
    with an entry): what `close_entry` does, without a coroutine of its own on the
    request's path.
    """

    __slots__ = ()

    def __init__(
        self, lc: Lifecycle, entry: Entry, exc: BaseException | None, step: Any, first: Any
    ) -> None:
        _Shielded.__init__(self, lc, entry.res, step, first)
        self.entry = entry
        self.exc = exc


async def _drive(
    lc: Lifecycle,
    res: Resource[Any],
    coro: Any,
    *,
    bounded: bool = True,
    limit: float | None = None,
) -> Any:
    """Run a cleanup coroutine shielded from cancellation and bounded in time (by
    close_timeout; *bounded* False: an open in a thread, bounded by *limit* seconds if
    given, past which it raises ``TimeoutError``).

    Most cleanups finish without suspending (nothing to await, or a pool release that
    completes at once). So on asyncio the coroutine is first stepped by hand: if it
    finishes there, no cancellation could have reached it. Only a cleanup that really
    waits pays for the shield (`_Shielded`). Elsewhere (trio), the whole cleanup runs in
    a shielded anyio cancel scope with a deadline.
    """
    if asyncio._get_running_loop() is None:
        return await _drive_anyio(lc, res, coro)
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return stop.value
    return await _Shielded(lc, res, coro, first, bounded=bounded, limit=limit)


async def _drive_anyio(lc: Lifecycle, res: Resource[Any], coro: Any) -> Any:
    with anyio.CancelScope(shield=True) as cs:
        cs.deadline = anyio.current_time() + lc.close_timeout
        result = await coro
    if cs.cancelled_caught:
        _close_timed_out(lc, res)
    return result


#: Futures a cleanup waits on to their end, past its deadline and its salvage too: each is
#: bounded of its own (`wait_to_the_end`).
_TO_THE_END: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()


def wait_to_the_end(task: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """*task*, shielded, for a cleanup to await to its end even past its close_timeout and
    salvage, which cancel every other wait: an integration's last resort, bounded of its
    own (ending a backend still running a query on the server), which must be done before
    the client gets its answer, or a ``COMMIT`` still waiting for a lock there could commit
    after the client's 500. Cancelled from elsewhere (an anyio scope), the task runs on."""
    outer = asyncio.shield(task)
    _TO_THE_END.add(outer)
    return outer


#: Seconds a cleanup past its close_timeout has to end in a known state (`_Shielded.expire`):
#: longer than psycopg gives its own cancel request (a new connection to the server) and then
#: the query's end, 5 s each, so that psycopg ends that itself and the integration's last
#: resort (`pg_terminate_backend` on a connection of its own) still runs after it. At 5 s,
#: then 10 s, CI's load cut psycopg's cancel short: it closed the connection, nothing ended
#: the backend, and the `COMMIT` went on waiting on the server.
SALVAGE = 12.0

_ABANDONED = "Closing resource "  # how `_close_timed_out`'s message begins


def _close_timed_out(lc: Lifecycle, res: Resource[Any]) -> None:
    res.counters.timeouts += 1
    msg = (
        f"{_ABANDONED}{res.name!r} took longer than close_timeout={lc.close_timeout:g} s "
        f"and was cut short: what it waited on was cancelled (the integrations' drivers "
        f"cancel a statement on the server: a COMMIT waiting for a lock there is rolled "
        f"back), and its connection may not have been returned in a known state. Look for "
        f"a cleanup that waits on the network (a COMMIT waiting for a lock), or for a task "
        f"still using the value after its unit of work ended (one not awaited), or raise "
        f"close_timeout."
    )
    raise TimeoutError(msg)


def _count_closed(lc: Lifecycle, entry: Entry, failed: BaseException | None = None) -> None:
    """Count *entry* closed (*failed*: its cleanup's failure, or abandoned past
    close_timeout)."""
    c = entry.res.counters
    c.closed += 1
    c.in_use -= 1
    held = _now() - entry.opened_at
    c.hold_time += held
    if held > c.max_hold_time:
        c.max_hold_time = held
    if entry.leak_reported is not None:
        _leak_given_back(entry, held, failed)
    elif held > lc._leak_floor:
        _leak_at_close(lc, entry, held)


def _leak_given_back(entry: Entry, held: float, failed: BaseException | None = None) -> None:
    """A value reported as a leak (held past ``leak_threshold``) has now closed: say so,
    once, so that a report in the log is followed by its end (HikariCP's "previously
    reported leaked connection was returned"). Not a warning: nothing is wrong any more.
    Its cleanup *failed* (or was abandoned): say that instead (its error is logged)."""
    if failed is not None:
        log.info(
            "tether: resource %r, reported as held too long by %s, was not given back after "
            "%.1f s: its cleanup %s (see the error logged for it)",
            entry.res.name,
            entry.leak_reported,
            held,
            "was cut short past close_timeout" if _abandoned(failed) else "failed",
            extra={"tether_resource": entry.res.name},
        )
        return
    log.info(
        "tether: resource %r, reported as held too long by %s, was given back after %.1f s",
        entry.res.name,
        entry.leak_reported,
        held,
        extra={"tether_resource": entry.res.name},
    )


def _abandoned(failure: BaseException) -> bool:
    """Whether *failure* is `_close_timed_out`'s: the cleanup abandoned past close_timeout."""
    return isinstance(failure, TimeoutError) and str(failure).startswith(_ABANDONED)


def _leak_at_close(lc: Lifecycle, entry: Entry, held: float) -> None:
    """*entry*, never reported, closes after *held* seconds, past the lowest leak
    threshold of *lc*: if past its unit's own, report it now (the sweep, which runs on the
    event loop, did not see it: the loop was blocked, by a sync call in an ``async def``,
    or no sweep had run since it went past)."""
    unit = entry.unit
    if unit is None:  # an app value
        return
    try:
        threshold = lc._leak_threshold_of(unit)
        if threshold is None or not held > threshold:
            return
        lc._report_leak(unit, entry, held, threshold, at_close=True)
    except Exception:  # a diagnostic: never the close's failure
        log.debug("tether: the leak of %r seen at its close", entry.res.name, exc_info=True)


def start_close(lc: Lifecycle, entry: Entry, exc: BaseException | None) -> Any:
    """Begin closing one value: ``None`` if it closed already, else an awaitable that finishes.

    Most cleanups finish without suspending (a generator with nothing to await after its
    ``yield``, a pool release that completes at once). Those are run here, synchronously:
    no coroutine, and no cancellation could have reached them. Raises the cleanup's own
    failure (counted), never *exc* re-raised.
    """
    res = entry.res
    if exc is not None and res.error_status is not None:
        exc = _as_failure(res.error_status, exc)
    kind = res.kind
    if kind is Kind.ASYNC_GEN:
        if asyncio._get_running_loop() is None:
            return close_entry(lc, entry, exc)
        handle = entry.handle
        step = handle.__anext__() if exc is None else handle.athrow(exc)
        try:
            first = step.send(None)
        except StopAsyncIteration:
            # `_count_closed`, inlined: this is every request's path.
            c = res.counters
            c.closed += 1
            c.in_use -= 1
            held = _now() - entry.opened_at
            c.hold_time += held
            if held > c.max_hold_time:
                c.max_hold_time = held
            if entry.leak_reported is not None:
                _leak_given_back(entry, held)
            elif held > lc._leak_floor:
                _leak_at_close(lc, entry, held)
            return None
        except StopIteration:
            return close_entry(lc, entry, exc, again=True)
        except BaseException as failure:
            _count_closed(lc, entry, None if failure is exc else failure)
            if failure is exc:
                return None
            res.counters.close_errors += 1
            raise
        return _ClosingStep(lc, entry, exc, step, first)
    if (kind is Kind.SYNC_GEN or kind is Kind.SYNC_CM) and not res.thread:
        try:
            _close_sync(res, entry.handle, exc)
        except BaseException as failure:
            if failure is not exc:
                _count_closed(lc, entry, failure)
                res.counters.close_errors += 1
                raise
        _count_closed(lc, entry)
        return None
    return close_entry(lc, entry, exc)


async def close_entry(
    lc: Lifecycle,
    entry: Entry,
    exc: BaseException | None,
    again: bool = False,
) -> None:
    """Close one value. Raises the cleanup's own failure (not *exc* re-raised).

    *again*: `start_close` already ran the generator's cleanup step, and it yielded again.
    """
    res = entry.res
    kind = res.kind
    handle = entry.handle
    failed: BaseException | None = None
    try:
        if kind is Kind.ASYNC_GEN:
            if not again:  # else `start_close` ran the step, and it yielded again
                try:
                    await _drive(lc, res, handle.__anext__() if exc is None else handle.athrow(exc))
                except StopAsyncIteration:
                    return
            await _drive(lc, res, handle.aclose())
            raise RuntimeError(_yielded_again(res))
        if kind is Kind.ASYNC_CM:
            if exc is None:
                await _drive(lc, res, handle.__aexit__(None, None, None))
            else:
                await _drive(lc, res, handle.__aexit__(type(exc), exc, exc.__traceback__))
        elif kind is Kind.SYNC_GEN or kind is Kind.SYNC_CM:
            closer = partial(_close_sync, res, handle, exc)
            if res.thread:
                # Shielded like any cleanup (an anyio shield alone does not stop a native
                # `task.cancel()`, which cancels the future of the thread); abandoned
                # only past close_timeout, since a thread cannot be interrupted. The wait
                # for a thread of the close limiter is not the cleanup's time: a cleanup
                # abandoned before its thread started would never run (its connection
                # checked out, idle in transaction, for good).
                with anyio.CancelScope(shield=True):
                    await _close_thread(lc, res)
                    try:
                        await _drive(
                            lc,
                            res,
                            anyio.to_thread.run_sync(
                                closer, limiter=lc._thread_runner, abandon_on_cancel=True
                            ),
                        )
                    finally:
                        lc._close_limiter.release()
            else:
                closer()
    except BaseException as failure:
        if failure is exc:
            return  # the cleanup let the original failure through: that is not a new one
        failed = failure
        res.counters.close_errors += 1
        raise
    finally:
        _count_closed(lc, entry, failed)


async def _close_thread(lc: Lifecycle, res: Resource[Any]) -> None:
    """Take a thread of the close limiter for a sync cleanup: at once when one is free (no
    suspension), else waiting for one as long as it takes, shielded from cancellation
    (native too: `_drive`), and not counted toward ``close_timeout``."""
    limiter = lc._close_limiter
    try:
        limiter.acquire_nowait()
    except anyio.WouldBlock:
        if asyncio._get_running_loop() is None:  # trio: an anyio shield is enough
            with anyio.CancelScope(shield=True):
                await limiter.acquire()
        else:
            await _drive(lc, res, limiter.acquire(), bounded=False)


def _close_sync(res: Resource[Any], handle: Any, exc: BaseException | None) -> None:
    if res.kind is Kind.SYNC_CM:
        if exc is None:
            handle.__exit__(None, None, None)
        else:
            handle.__exit__(type(exc), exc, exc.__traceback__)
        return
    try:
        if exc is None:
            next(handle)
        else:
            handle.throw(exc)
    except StopIteration:
        return
    handle.close()
    raise RuntimeError(_yielded_again(res))


def _yielded_again(res: Resource[Any]) -> str:
    return (
        f"Resource {res.name!r}: its generator yielded more than once. A generator resource "
        f"yields its value once (`yield value`), then cleans up: look for a second `yield` "
        f"(in a loop, or in a `finally` or an `except` after the first one). tether closed the "
        f"generator."
    )


async def close_entries(
    lc: Lifecycle, entries: list[Entry], exc: BaseException | None, errors: list[BaseException]
) -> BaseException | None:
    """Close *entries* in reverse order, every one even if some fail.

    Like ``contextlib.ExitStack``, a cleanup that fails replaces the exception the ones
    opened before it see. Failures are logged and appended to *errors*. Returns the
    exception the unit of work ends with.
    """
    if entries and in_anyio_scope():
        # anyio cancels a scope again at every await in it: the native shield alone
        # would hold that off at each wait but not at anyio's own checkpoints.
        with anyio.CancelScope(shield=True):
            return await close_all(lc, entries, exc, errors)
    return await close_all(lc, entries, exc, errors)


async def close_all(
    lc: Lifecycle, entries: list[Entry], exc: BaseException | None, errors: list[BaseException]
) -> BaseException | None:
    """`close_entries` without its anyio shield, for a caller that knows its task is
    not in an anyio cancel scope (the native shield of each cleanup is enough there)."""
    while entries:
        entry = entries.pop()
        try:
            pending = start_close(lc, entry, exc)
            if pending is not None:
                await pending
        except BaseException as failure:
            exc = close_failed(entry, failure, exc, errors)
        if entry.res.guard:
            object.__setattr__(entry.value, "_tether_closed", True)
    return exc


def _as_failure(error_status: Any, exc: BaseException) -> BaseException | None:
    """*exc*, or None where the resource's ``error_status`` says its status is no failure:
    a :class:`FailedResponse`, or Starlette's ``HTTPException`` (FastAPI's too). Only
    those carry the response's status: another exception's ``status_code`` (an SDK's
    ``APIStatusError``) is its upstream's, and the client gets a 500 (or what the app's
    handler answers), so it is a failure."""
    status: object
    if isinstance(exc, FailedResponse):
        status = exc.status_code
    else:
        exceptions = sys.modules.get("starlette.exceptions")
        if exceptions is None or not isinstance(exc, exceptions.HTTPException):
            return exc
        status = exc.status_code
    if not isinstance(status, int):
        return exc
    try:
        failed = error_status(status)
    except Exception as error:  # the user's function: said (once), and rolled back
        if error_status not in _SAID_ERROR_STATUS:
            _SAID_ERROR_STATUS.add(error_status)
            what = getattr(error_status, "__qualname__", None) or repr(error_status)
            log.error(
                "tether: error_status=%s raised %s for status %d: it is given the response's "
                "status code (an int) and returns whether it is a failure (e.g. "
                "error_status=lambda status: status >= 500). Its resource is rolled back "
                "for each such response; said once",
                what,
                describe(error),
                status,
                exc_info=error,
            )
        return exc
    return None if not failed else exc


#: The ``error_status`` functions that raised, said once each (`_as_failure`).
_SAID_ERROR_STATUS: weakref.WeakSet[Any] = weakref.WeakSet()


def _http_exception(failure: BaseException) -> bool:
    """Whether *failure* is Starlette's (FastAPI's) ``HTTPException``, which the app answers
    with its status: not any exception with a ``status_code`` (an SDK's ``APIStatusError``
    carries its upstream's 429, and the client gets a 500: it was logged at INFO as
    "answered 429", trial 38). Starlette is imported by whoever raised one."""
    starlette = sys.modules.get("starlette.exceptions")
    return starlette is not None and isinstance(failure, starlette.HTTPException)


def close_failed(
    entry: Entry, failure: BaseException, exc: BaseException | None, errors: list[BaseException]
) -> BaseException:
    """Log a cleanup's failure, chain it to *exc*, record it; it is what the rest then see."""
    if isinstance(failure, ResourceUnavailable | ScopeError):
        # A cleanup that deliberately reports its backend as unavailable (a lost
        # connection turned into a 503), or a misuse it saw (a connection used by two
        # tasks at once): expected, not a crash.
        log.warning(
            "tether: closing resource %r: %s",
            entry.res.name,
            describe(failure),
            extra={"tether_resource": entry.res.name},
        )
    elif _http_exception(failure):
        # An answer the cleanup chose (``raise HTTPException(409)`` for a conflict its flush
        # found): the app's handler answers with its status, as for one raised by a handler,
        # which Starlette does not log either. Noted, without a traceback.
        log.info(
            "tether: closing resource %r answered %s: %s",
            entry.res.name,
            failure.status_code,  # type: ignore[attr-defined]
            describe(failure),
            extra={"tether_resource": entry.res.name},
        )
    else:
        log.error(
            "tether: closing resource %r failed: %s",
            entry.res.name,
            describe(failure),
            exc_info=failure,
            extra={"tether_resource": entry.res.name},
        )
    if exc is not None and failure.__context__ is None:
        failure.__context__ = exc
    errors.append(failure)
    return failure


# --------------------------------------------------------------------------- guard


class Guarded:
    """A transparent proxy for a value opened with ``guard=True``.

    Attribute access, calls, item access (``c["k"]``), ``in``, iteration and ``with`` go to
    the value while its scope is open, and raise :class:`~tether.ResourceClosedError` after
    (counted as one leak, however often used). Not ``len()`` nor truth: a ``__len__`` here
    would make ``bool(proxy)`` fail for a value without one.
    """

    __slots__ = ("_tether_closed", "_tether_counted", "_tether_res", "_tether_value")

    def __init__(self, res: Resource[Any], value: Any) -> None:
        object.__setattr__(self, "_tether_res", res)
        object.__setattr__(self, "_tether_value", value)
        object.__setattr__(self, "_tether_closed", False)
        object.__setattr__(self, "_tether_counted", False)

    def _tether_check(self) -> Any:
        if self._tether_closed:
            res = self._tether_res
            if not self._tether_counted:
                object.__setattr__(self, "_tether_counted", True)
                res.counters.leaks += 1
            msg = (
                f"Resource {res.name!r} was used after its scope closed. "
                f"Do not keep request resources beyond their unit of work: background "
                f"work should open its own `async with lc.scope()`."
            )
            raise ResourceClosedError(msg, resource=res.name)
        return self._tether_value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tether_check(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._tether_check(), name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tether_check()(*args, **kwargs)

    def __getitem__(self, key: Any) -> Any:
        return self._tether_check()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._tether_check()[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._tether_check()[key]

    def __contains__(self, item: Any) -> bool:
        return item in self._tether_check()

    def __iter__(self) -> Any:
        # Defined with __getitem__: else `iter()` would index the value from 0 (a dict's
        # KeyError: 0) where the value has its own iteration, or none (a TypeError).
        return iter(self._tether_check())

    def __aiter__(self) -> Any:
        return aiter(self._tether_check())

    async def __aenter__(self) -> Any:
        return await self._tether_check().__aenter__()

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._tether_check().__aexit__(*exc)

    def __enter__(self) -> Any:
        return self._tether_check().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._tether_check().__exit__(*exc)

    def __repr__(self) -> str:
        state = "closed" if self._tether_closed else "open"
        return f"<tether guarded {self._tether_res.name!r} ({state}): {self._tether_value!r}>"


# --------------------------------------------------------------------------- the unit


# And, off the main thread, those of a thread that runs an event loop for a portal
# (Starlette's TestClient).
_RUNNERS = (*_TETHER_DIRS, *code_of("threading", "concurrent"))
_MAIN = threading.main_thread()


def capture_stack(depth: int = 2) -> list[tuple[str, int, str]]:
    """The caller's frames outside tether and the frameworks, innermost last. A unit of work
    entered through a portal (``client.portal.wrap_async_context_manager(lc.scope())``) has
    none in its thread, which only runs the event loop: the caller is the main thread,
    waiting on the portal, and its frames are taken."""
    if threading.current_thread() is _MAIN:
        return user_frames(sys._getframe(depth), _TETHER_DIRS)
    frames = user_frames(sys._getframe(depth), _RUNNERS)
    if not frames and _MAIN.ident is not None:
        frames = outside(thread_frames().get(_MAIN.ident, []), _RUNNERS)
    return frames


_FRAME_LINE = re.compile(r'^  File "(.*)", line (\d+) in (.*)$')


def thread_frames() -> dict[int, list[tuple[str, int, str]]]:
    """Every thread's frames, innermost first, by thread ident, read by ``faulthandler`` in
    one C call that holds the GIL. Another thread's frames are never walked from Python
    (``sys._current_frames()``, then ``f_back``): that thread runs between two steps of
    such a walk, and on CPython 3.11 a frame it returns from meanwhile crashes the process
    (a segfault in ``f_back``, seen on CI while TestClient's main thread started the app).
    Diagnostics only: at an app scope's entry, and in leak reports."""
    try:
        with _dump_file() as out:
            faulthandler.dump_traceback(out, all_threads=True)
            out.seek(0)
            text = out.read().decode("ascii", "replace")
    except OSError:  # no file to dump into (a read-only filesystem, no memfd): no frames
        return {}
    threads: dict[int, list[tuple[str, int, str]]] = {}
    frames: list[tuple[str, int, str]] | None = None
    for line in text.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            ident = int(line.partition("0x")[2].split(" ", 1)[0], 16)
            frames = threads.setdefault(ident, [])
        elif frames is not None:
            found = _FRAME_LINE.match(line)
            if found:
                frames.append((found[1], int(found[2]), found[3]))
    return threads


def _dump_file() -> Any:
    """A file for faulthandler's dump (it writes to a file descriptor): in memory where
    Linux has memfd, so that a read-only filesystem (a container's, with no writable
    temporary directory) does not stop it; else a temporary file."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            return os.fdopen(memfd_create("tether-frames", os.MFD_CLOEXEC), "w+b")
        except OSError:  # a kernel or sandbox without it
            pass
    return tempfile.TemporaryFile()


def _escaped(text: str) -> str:
    """*text* as faulthandler writes it: printable ASCII kept, any other character as
    ``\\xHH``, ``\\uHHHH`` or ``\\UHHHHHHHH`` (a backslash itself is kept, so its text cannot
    be read back without ambiguity: ``C:\\build\\x64``). Names are compared in this form."""
    if text.isascii() and text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


# What faulthandler writes for a character other than printable ASCII.
_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")


def _read_back(m: re.Match[str]) -> str:
    code = int(m[1] or m[2] or m[3], 16)
    # Only what faulthandler writes so: a literal "\\x64" (it writes "d") is left as it is.
    if m[1] is not None:
        written = code < 0x20 or code >= 0x7F
    else:
        written = code > (0xFF if m[2] is not None else 0xFFFF)
    return chr(code) if written else m[0]


def _unescaped(text: str) -> str:
    """A name as faulthandler wrote it, for display: its characters outside ASCII back (a
    project under ``/home/josé/``). Best effort: a literal ``\\x86`` in a name reads as one."""
    if "\\" not in text:
        return text
    return _ESCAPE.sub(_read_back, text)


def outside(
    frames: list[tuple[str, int, str]], skipped: tuple[str, ...]
) -> list[tuple[str, int, str]]:
    """*frames* (innermost first, as `thread_frames` gives them: names as faulthandler
    wrote them) whose files are not under *skipped*, innermost last (bounded: `bounded`),
    names read back, as `user_frames` gives them."""
    prefixes = tuple(_escaped(prefix) for prefix in skipped)
    kept = [frame for frame in frames if not frame[0].startswith(prefixes)]
    kept.reverse()
    return bounded([(_unescaped(f), line, _unescaped(name)) for f, line, name in kept])


def user_frames(f: Any, skipped: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """The frames from *f* outward whose files are not under *skipped*, innermost last (at
    most 12)."""
    frames: list[tuple[str, int, str]] = []
    while f is not None and len(frames) < _MOST_FRAMES:
        filename = f.f_code.co_filename
        if not filename.startswith(skipped):
            frames.append((filename, f.f_lineno, f.f_code.co_name))
        f = f.f_back
    frames.reverse()
    return frames


#: The most frames a stack in a leak report gives, and of those, the most given of the
#: libraries the innermost frame of the user's code called.
_MOST_FRAMES = 12
_LIBRARY_FRAMES = 4


def _library_dirs() -> tuple[str, ...]:
    """Where the standard library and installed packages are: a frame there is not the
    user's (the project's own code is elsewhere: installed as a package, it reads as a
    library's, and the innermost frames are kept)."""
    paths = sysconfig.get_paths()
    dirs = {paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return (*sorted(os.path.join(d, "") for d in dirs if d), "<frozen ")


_LIBRARY_DIRS = _library_dirs()


def bounded(frames: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """*frames* (innermost last) cut to `_MOST_FRAMES`, keeping the user's: the innermost
    frame outside the standard library and installed packages, and its callers, with at
    most `_LIBRARY_FRAMES` of the library frames below it (the call into the library, and
    where it waits). A request awaiting a slow HTTP client lost its endpoint's line under
    a dozen of the client's frames. No frame of the user's: the innermost ones."""
    if len(frames) <= _MOST_FRAMES:
        return frames
    user = len(frames) - 1
    while user >= 0 and frames[user][0].startswith(_LIBRARY_DIRS):
        user -= 1
    if user < 0:
        return frames[-_MOST_FRAMES:]
    below = frames[user + 1 :]
    if len(below) > _LIBRARY_FRAMES:
        below = [below[0], *below[len(below) - _LIBRARY_FRAMES + 1 :]]
    return frames[: user + 1][-(_MOST_FRAMES - len(below)) :] + below


# The step of anyio that runs a function in a worker thread (its asyncio and trio
# backends): its `func` is what the thread runs.
_IN_THREAD = "run_sync_in_worker_thread"


def task_stack(task: Any) -> tuple[list[tuple[str, int, str]], Any]:
    """Where a suspended asyncio *task* waits: the frames of its await chain outside
    tether and the frameworks, innermost last, not bounded; and the function a worker
    thread runs for it if it waits for one (anyio's ``run_sync``: a ``def`` endpoint or
    dependency), else None. (``Task.get_stack`` stops at the outermost coroutine: a
    suspended coroutine's frame has no ``f_back``.)"""
    frames: list[tuple[str, int, str]] = []
    in_thread: Any = None
    # `_coro`, not `get_coro()`: the same on CPython's tasks, and None on granian's
    # `--task-impl rust` tasks, whose `get_coro()` crashes the process.
    aw = getattr(task, "_coro", None)
    for _ in range(64):  # an await chain is never this deep; stop on anything circular
        if aw is None:
            break
        if type(aw).__name__ in _ASYNC_GEN_STEPS:  # `__anext__()` of an async generator
            aw = next(
                (r for r in gc.get_referents(aw) if isinstance(r, types.AsyncGeneratorType)), None
            )
            continue
        frame = getattr(aw, "cr_frame", None) or getattr(aw, "ag_frame", None)
        frame = frame or getattr(aw, "gi_frame", None)
        if frame is not None:
            filename = frame.f_code.co_filename
            if not filename.startswith(_TETHER_DIRS):
                frames.append((filename, frame.f_lineno, frame.f_code.co_name))
            elif frame.f_code.co_name == _IN_THREAD:
                # A suspended coroutine's frame, on this thread: its locals are safe to read.
                in_thread = frame.f_locals.get("func")
        step = getattr(aw, "cr_await", None) or getattr(aw, "ag_await", None)
        aw = step or getattr(aw, "gi_yieldfrom", None)
    return frames, in_thread


def count_open_failure(counters: Counters, exc: BaseException, name: str) -> None:
    """Count an open of resource *name* that failed with *exc*: not a cancelled one (a
    client gone, a timeout of the caller's), which is no failure of the resource. A
    ``ResourceUnavailable`` its factory raised naming nothing is named after it."""
    if isinstance(exc, Exception) and not isinstance(exc, ClientDisconnected):
        counters.open_errors += 1
        if isinstance(exc, ResourceUnavailable):
            if exc.resource is None:
                exc.resource = name
            if exc.timed_out:
                counters.timeouts += 1


def _code_run(func: Any) -> Any:
    """The code object a worker thread runs for *func* (a ``functools.partial`` of it, a
    decorated function, a sync context manager's ``__enter__``: its generator's), or None."""
    for _ in range(16):
        if not isinstance(func, partial):
            break
        func = func.func
    gen = getattr(getattr(func, "__self__", None), "gen", None)  # contextlib's __enter__
    if isinstance(gen, types.GeneratorType):
        return gen.gi_code
    try:
        func = inspect.unwrap(func)
    except ValueError:  # a cycle of __wrapped__
        return None
    code = getattr(func, "__code__", None)
    if code is None and not isinstance(func, (types.FunctionType, types.MethodType)):
        code = getattr(type(func).__call__, "__code__", None)  # a callable object
    return code


def thread_stack(func: Any, value: Any) -> list[tuple[str, int, str]]:
    """Where a worker thread running *func* (a ``def`` endpoint or dependency: its
    request's task only waits for the thread) is now: the frames outside tether, the
    frameworks and the thread's machinery (threading's), innermost last. Several threads
    running it at once: none (which one holds *value* would take reading a running
    thread's locals, see `thread_frames`)."""
    code = _code_run(func) if func is not None else None
    if code is None or code.co_filename.startswith(_TETHER_DIRS):
        return []  # tether's or a framework's: it would match every thread running one
    site = (_escaped(code.co_filename), _escaped(code.co_name))  # as faulthandler writes them
    found = [
        frames
        for frames in thread_frames().values()
        if any((filename, name) == site for filename, _, name in frames)
    ]
    return outside(found[0], _RUNNERS) if len(found) == 1 else []


def ready_args(unit: Unit, res: Resource[Any]) -> list[Any] | None:
    """The values *res* depends on if they are all open already (in *unit*, or app
    values), else None. No override may be active (the caller checks)."""
    values = unit.values
    app = unit.lc._app_values
    args = []
    for dep in res.deps:
        value = values.get(dep, _MISSING)
        if value is _MISSING:
            if dep.scope != "app":
                return None
            value = app.get(dep, _MISSING)
            if value is _MISSING:
                return None
        elif value is OPENING:
            return None
        args.append(value)
    return args


def _first(res: Resource[Any], gen: Any) -> Any:
    """The value a sync generator yields first (run on the loop: ``thread=False``)."""
    try:
        return next(gen)
    except StopIteration:
        raise no_value(res) from None


def coroutine_value(res: Resource[Any], value: Any) -> TypeError:
    """The error for a plain-function resource whose value is a coroutine: it called an
    async function without awaiting it (the coroutine is closed: never awaited, no warning
    of Python's besides)."""
    value.close()
    called = getattr(value, "__name__", "an async function")
    msg = (
        f"Resource {res.name!r}: its function returned a coroutine ({called}(...), not "
        f"awaited), which would be handed out as the value. Make the factory `async def` and "
        f"await the call (`return await {called}(...)`), or return what it should give."
    )
    return for_good(TypeError(msg))


def no_value(res: Resource[Any], what: str = "its generator") -> RuntimeError:
    """The error for a generator resource that returned without yielding (*what*: a context
    manager's generator): a mistake in the code, which no retry mends (`for_good`)."""
    msg = (
        f"Resource {res.name!r}: {what} returned without yielding a value. A generator "
        f"resource yields its value once (`yield value`) and cleans up after the yield: check "
        f"the path that returned before it (an early `return`, an `if` around the `yield`)."
    )
    return for_good(RuntimeError(msg))


#: contextlib's error for a ``@contextmanager`` / ``@asynccontextmanager`` generator that
#: returned without yielding.
_DID_NOT_YIELD = "generator didn't yield"


def _cm_no_value(res: Resource[Any], cm: Any, exc: RuntimeError) -> RuntimeError | None:
    """For *exc*, raised by entering *cm*: tether's `no_value` in place of contextlib's bare
    "generator didn't yield" (which names no resource); None for any other error."""
    if str(exc) == _DID_NOT_YIELD and isinstance(
        cm, contextlib._GeneratorContextManager | contextlib._AsyncGeneratorContextManager
    ):
        return no_value(res, "its context manager's generator (contextlib)")
    return None


class Unit:
    """A request scope: one unit of work (a request, a WebSocket, a job, a test).

    Values are opened on first :meth:`get`, at most once, and closed in reverse order
    when the unit ends, seeing the exception that ended it. Use it through
    ``async with lc.scope() as s: await s.get(res)``; *label* is the label given,
    *started* the ``time.perf_counter()`` reading when it began, *closed* true once it
    ended. Made by ``lc.scope()`` (and by tether for each request): one made by hand is not
    counted, drained at shutdown or watched for leaks.
    """

    __slots__ = (
        "__weakref__",
        "closed",
        "entries",
        "label",
        "late",
        "lc",
        "started",
        "track_stacks",
        "values",
        "waiting",
    )

    def __init__(self, lc: Lifecycle, label: str, *, track_stacks: bool = False) -> None:
        self.lc = lc
        self.label = label
        self.values: dict[Resource[Any], Any] = {}
        self.entries: list[Entry] = []
        self.closed = False
        self.started = _now()
        self.track_stacks = track_stacks
        self.late = False  # some value is released after the response
        # Tasks awaiting an open: the event each waits on, by resource; and by that event,
        # the error of an open that failed (`_open_failed`), raised in each of them.
        self.waiting: dict[Any, Any] | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.entries)} open"
        return f"<tether.Unit {self.label!r} ({state})>"

    async def get(self, res: Resource[T]) -> T:
        """Return the value of *res* in this unit, opening it (and what it needs) if needed."""
        value = self.values.get(res, _MISSING)
        if value is _MISSING:
            return await self._open(res)
        if value is OPENING:
            # Another task of this unit is opening it: wait for that, do not open twice.
            waiting = self.waiting
            if waiting is None:
                waiting = self.waiting = {}
            event = waiting.get(res)
            if event is None:
                event = waiting[res] = anyio.Event()
            await event.wait()
            # That open failed: its error, not an open of this task's own (N tasks waited N
            # times the timeout one after the other, each counted: trial 24).
            failed = waiting.get(event)
            if failed is not None:
                raise failed
            return await self.get(res)
        return value  # type: ignore[no-any-return]

    async def run_sync(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread and return what it returns: sync code on a
        sync resource's value (a ``sync_session``), off the event loop.

        It is waited for to its end even when the unit of work is cancelled (a deadline
        around it, ``task.cancel()``, the drain at shutdown): no cancellation stops a
        thread, and the unit's values would otherwise close under a statement it still
        runs (its connection back in the pool mid-statement). The cancellation is raised
        once it has returned. The thread sees the caller's context variables.
        """
        if asyncio._get_running_loop() is None:  # trio: its cancellations are scopes'
            with anyio.CancelScope(shield=True):
                result = await anyio.to_thread.run_sync(partial(fn, *args))
            await anyio.lowlevel.checkpoint_if_cancelled()
            return result
        thread = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        cancelled: asyncio.CancelledError | None = None
        # An anyio scope's cancellation waits for the shield's end (asked again each loop
        # iteration, it would keep the loop busy); a one-shot `task.cancel()` is held here.
        with anyio.CancelScope(shield=True):
            while not thread.done():
                try:
                    await asyncio.wait((thread,))
                except asyncio.CancelledError as exc:
                    cancelled = exc
        if cancelled is not None:
            failed = thread.exception()  # (retrieved: asyncio would log it as never retrieved)
            raise cancelled from failed
        await anyio.lowlevel.checkpoint_if_cancelled()
        return thread.result()

    async def _open(self, res: Resource[T]) -> T:
        lc = self.lc
        if self.closed:
            msg = (
                f"Cannot open resource {res.name!r}: {self.label} has already ended. "
                f"Open a new `async with lc.scope()` for work that outlives it."
            )
            raise ResourceClosedError(msg, resource=res.name)
        try:
            foreign = res.lifecycle is not lc
        except AttributeError:  # not a Resource at all
            name = getattr(res, "__qualname__", None)
            what = f"the function {name}" if name else repr(res)
            msg = (
                f"s.get() was given {what}, which is not a tether resource. Pass what "
                f"@lc.resource returned (e.g. `await s.get(conn)`); register a plain "
                f"function with @lc.resource first."
            )
            raise TypeError(msg) from None
        if foreign:
            msg = (
                f"Resource {res.name!r} belongs to another Lifecycle than this scope's. "
                f"Use the Lifecycle the resource was registered on."
            )
            raise ScopeError(msg)
        target = res
        if lc._overrides:
            target = lc._overrides.get(res, res)
        if target.scope == "app":
            value = lc._app_value(res)
            self.values[res] = value
            return value
        self.values[res] = OPENING
        started = False  # a dependency's failure to open is not this resource's error
        try:
            args: Any = ()
            if target.deps:
                args = None if lc._overrides else ready_args(self, target)
                if args is None:
                    args = [await self.get(d) for d in target.deps]
            started = True
            t0 = _now()
            kind = target.kind
            if target.timeout is not None or target.thread:
                value, handle = await open_value(lc, target, list(args))
            elif kind is Kind.ASYNC_GEN:
                # The common cases inline: no extra coroutine layers on the hot path.
                handle = target.call(*args)
                try:
                    value = await handle.__anext__()
                except StopAsyncIteration:
                    raise no_value(res) from None
            elif kind is Kind.SYNC_FUNC:
                value, handle = target.call(*args), None
                if type(value) is CoroutineType:
                    raise coroutine_value(res, value)
            elif kind is Kind.ASYNC_FUNC:
                value, handle = await target.call(*args), None
            elif kind is Kind.SYNC_GEN:
                handle = target.call(*args)
                value = _first(target, handle)
            else:
                value, handle = await open_value(lc, target, list(args))
        except BaseException as exc:
            if started:
                count_open_failure(target.counters, exc, res.name)
            self._open_failed(res, exc)
            raise
        if self._ended():  # the unit ended while this opened (asked for by a task of its own)
            await self._opened_too_late(res, target, handle, value, t0)
        return self._add(res, target, handle, value, t0)  # type: ignore[no-any-return]

    def _ended(self) -> bool:
        return self.closed

    async def _opened_too_late(
        self, res: Resource[Any], target: Resource[Any], handle: Any, value: Any, t0: float
    ) -> None:
        """A value that finished opening after its unit ended: closed at once, as a
        failure (it rolls back), and the task that asked gets `ResourceClosedError` (handed
        out, it was never closed by tether, or closed under the task by the unit's close)."""
        msg = (
            f"Cannot open resource {res.name!r}: {self.label} ended while it opened. Open a "
            f"new `async with lc.scope()` for work that outlives it."
        )
        error = ResourceClosedError(msg, resource=res.name)
        entries = self.entries
        before = len(entries)
        self._add(res, target, handle, value, t0)  # counted, as any value opened
        self.values.pop(res, None)
        if len(entries) > before:  # it has a cleanup: run it now
            await close_entries(self.lc, [entries.pop()], error, [])
        raise error

    def _add(
        self, res: Resource[Any], target: Resource[Any], handle: Any, value: Any, t0: float
    ) -> Any:
        """Record a value just opened for *res* (by *target*, its override or itself)."""
        c = target.counters
        now = _now()
        waited = now - t0
        c.wait_time += waited
        if waited > c.max_wait_time:
            c.max_wait_time = waited
        c.opened += 1
        if target.guard:
            value = Guarded(target, value)
        if not target.has_cleanup and not target.guard:
            c.closed += 1
        else:
            c.in_use += 1
            if c.in_use > c.max_in_use:
                c.max_in_use = c.in_use
            stack = capture_stack(3) if self.track_stacks else None
            entry = Entry(target, handle, value, stack, now, self)
            if entry.late:
                self.late = True
                if target.deps:
                    self._mark_late(target)
            self.entries.append(entry)
        self.values[res] = value
        if self.waiting is not None:
            self._opened(res)
        return value

    def _open_failed(self, res: Resource[Any], exc: BaseException | None = None) -> None:
        """Forget a value whose opening failed (the failure propagates); the tasks waiting
        for that open get its error *exc* (a cancellation of the opener's task: they open
        it themselves)."""
        self.values.pop(res, None)  # gone already if the unit ended meanwhile
        waiting = self.waiting
        if waiting is not None:
            event = waiting.pop(res, None)
            if event is not None:
                if isinstance(exc, Exception):
                    waiting[event] = exc
                event.set()

    def _opened(self, res: Resource[Any]) -> None:
        assert self.waiting is not None
        event = self.waiting.pop(res, None)
        if event is not None:
            event.set()

    def _mark_late(self, res: Resource[Any]) -> None:
        # A resource released after the response keeps what it depends on open as long:
        # an overridden one too, whose entry holds its replacement (trial 24: a test's fake
        # connection closed at the handler, under the cursor streaming from it).
        overrides = self.lc._overrides
        deps = {*res.deps, *(overrides.get(d, d) for d in res.deps)} if overrides else set(res.deps)
        for entry in self.entries:
            if entry.res in deps and not entry.late:
                entry.late = True
                self._mark_late(entry.res)

    async def aclose(self, exc: BaseException | None = None) -> list[BaseException]:
        """Close every value opened in this unit; return the cleanup failures."""
        self.closed = True
        self.values.clear()  # a later `get` must not hand out a closed value
        errors: list[BaseException] = []
        if self.entries:
            await close_entries(self.lc, self.entries, exc, errors)
        return errors

    async def release_early(self, exc: BaseException | None) -> list[BaseException]:
        """Close the values released at the handler (not the ``release="response"`` ones)."""
        errors: list[BaseException] = []
        entries = self.entries
        if not entries:
            return errors
        if not self.late:
            self.values.clear()
            await close_entries(self.lc, entries, exc, errors)
            return errors
        early = [e for e in entries if not e.late]
        entries[:] = [e for e in entries if e.late]
        for entry in early:
            for key, value in list(self.values.items()):
                if value is entry.value:
                    del self.values[key]
        await close_entries(self.lc, early, exc, errors)
        return errors
