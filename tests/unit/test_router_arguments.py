"""`health_router()` and `dashboard_router()` refuse a prefix FastAPI would fail on (its own
AttributeError or AssertionError), an infinite cache or refresh, and dependencies that are
not a list of Depends(...), where they are called, naming the argument and the fix."""

from typing import Any

import pytest
from fastapi import Depends

import tether
from tether.fastapi import dashboard_router, health_router

from ._messages import exactly

HEALTH = '"/live" and "/ready"'
DASHBOARD = '"/", "/stats.json" and "/checks.json"'


def require_admin() -> None:
    pass


def bad_prefix(fn: str, prefix: str, wrong: str, routes: str, fix: str) -> str:
    return (
        f'{fn}(prefix={prefix!r}): the prefix {wrong}: it must start with "/" and not end '
        f'with one, as its routes ({routes}) start with "/", or be "" for none. Pass {fix}.'
    )


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda lc: health_router(lc, prefix=5),  # type: ignore[arg-type]
            TypeError,
            "health_router(): prefix=5 is an int, not a string. Pass the path its routes go "
            'under, e.g. prefix="/health" (the default), or "" for none.',
        ),
        (
            lambda lc: health_router(lc, prefix=None),  # type: ignore[arg-type]
            TypeError,
            "health_router(): prefix=None is not a string. Pass the path its routes go under, "
            'e.g. prefix="/health" (the default), or "" for none.',
        ),
        (
            lambda lc: dashboard_router(lc, prefix=b"/ops"),  # type: ignore[arg-type]
            TypeError,
            "dashboard_router(): prefix=b'/ops' is a bytes, not a string. Pass the path its "
            'routes go under, e.g. prefix="/tether" (the default), or "" for none.',
        ),
        (
            lambda lc: health_router(lc, prefix="health"),
            ValueError,
            bad_prefix(
                "health_router", "health", 'does not start with "/"', HEALTH, 'prefix="/health"'
            ),
        ),
        (
            lambda lc: health_router(lc, prefix="/health/"),
            ValueError,
            bad_prefix("health_router", "/health/", 'ends with "/"', HEALTH, 'prefix="/health"'),
        ),
        (
            lambda lc: health_router(lc, prefix="/"),
            ValueError,
            bad_prefix(
                "health_router",
                "/",
                'ends with "/"',
                HEALTH,
                'prefix="" for its routes at the root',
            ),
        ),
        (
            lambda lc: dashboard_router(lc, prefix="ops/"),
            ValueError,
            bad_prefix(
                "dashboard_router",
                "ops/",
                'does not start with "/" and ends with "/"',
                DASHBOARD,
                'prefix="/ops"',
            ),
        ),
        (
            lambda lc: health_router(lc, cache=float("inf")),
            ValueError,
            "health_router(cache=inf): cache is how long, in seconds, /ready reuses the checks' "
            "report: an infinite cache would answer the first report for ever, never running "
            "the checks again. Pass a finite number, e.g. cache=1.0, or 0 to run the checks for "
            "every probe.",
        ),
        (
            # note33: a finite cache past any use answered the first report for ever too.
            lambda lc: health_router(lc, cache=1e308),
            ValueError,
            "health_router(cache=1e+308): cache is how long, in seconds, /ready reuses the "
            "checks' report: 1e+308 s is over a day, so /ready would go on answering 200 long "
            "after the database went away. Pass a number of seconds up to 86400, e.g. "
            "cache=1.0, or 0 to run the checks for every probe.",
        ),
        (
            lambda lc: dashboard_router(lc, refresh=float("inf")),
            ValueError,
            "dashboard_router(refresh=inf): refresh is how often the page polls its stats, in "
            "seconds, and must be at most 2,147,483 (about 24 days: past that, a browser's "
            "timer reads it as no delay, and the page would poll without pause); e.g. "
            "refresh=2.0, or 3600 for about never.",
        ),
        (
            # diff15 F2: a finite refresh past a browser's timer limit polled without pause.
            lambda lc: dashboard_router(lc, refresh=1e7),
            ValueError,
            "dashboard_router(refresh=10000000.0): refresh is how often the page polls its "
            "stats, in seconds, and must be at most 2,147,483 (about 24 days: past that, a "
            "browser's timer reads it as no delay, and the page would poll without pause); "
            "e.g. refresh=2.0, or 3600 for about never.",
        ),
        (
            lambda lc: dashboard_router(lc, dependencies=[require_admin]),
            TypeError,
            f"dashboard_router(): dependencies[0]={require_admin!r} is a function, not a "
            f"Depends(...). Wrap it: dependencies=[Depends(require_admin)].",
        ),
        (
            lambda lc: dashboard_router(lc, dependencies=5),  # type: ignore[arg-type]
            TypeError,
            "dashboard_router(): dependencies=5 is an int, not a list. Pass a list of "
            "Depends(...), e.g. dependencies=[Depends(require_admin)].",
        ),
    ],
    ids=[
        "health-prefix-int",
        "health-prefix-none",
        "dashboard-prefix-bytes",
        "health-prefix-no-slash",
        "health-prefix-trailing-slash",
        "health-prefix-root",
        "dashboard-prefix-both",
        "health-cache-inf",
        "health-cache-past-a-day",
        "dashboard-refresh-inf",
        "dashboard-refresh-past-timers",
        "dashboard-dependency-not-depends",
        "dashboard-dependencies-int",
    ],
)
def test_a_wrong_argument_is_refused_where_the_router_is_made(
    make: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=exactly(message)):
        make(tether.Lifecycle())


def test_one_depends_not_in_a_list_is_refused_naming_the_list() -> None:
    """`dependencies=Depends(require_admin)` (FastAPI: "'Depends' object is not iterable")."""
    given = Depends(require_admin)
    with pytest.raises(
        TypeError,
        match=exactly(
            f"dashboard_router(): dependencies={given!r} is a Depends, not a list. Pass a list "
            f"of Depends(...), e.g. dependencies=[Depends(require_admin)]."
        ),
    ):
        dashboard_router(tether.Lifecycle(), dependencies=given)
