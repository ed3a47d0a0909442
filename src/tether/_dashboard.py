"""The dashboard's data: one JSON-ready snapshot of a lifecycle, read from what it tracks.

The page (``dashboard.html``, served by :func:`tether.fastapi.dashboard_router`) polls it.
Nothing here runs on the request path: a snapshot reads the counters of ``lc.stats()`` and
the registry of units of work in flight that drain and leak detection keep anyway.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import socket
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle

# The units of work listed, oldest first: enough to find what holds a pool, bounded so a
# page polled every few seconds stays small under load.
MAX_UNITS = 50


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def snapshot(lc: Lifecycle, *, max_units: int = MAX_UNITS) -> dict[str, Any]:
    """The lifecycle's state, every resource's counters, and the oldest units in flight,
    with the process that answers (``pid``, ``host``): under several workers each read is
    one worker's own figures, whichever the server handed the request to."""
    stats = lc.stats()
    now = time.perf_counter()
    threshold = lc.leak_threshold
    in_flight = []
    for unit in lc._in_flight()[:max_units]:
        limit = lc._leak_threshold_of(unit)
        holding = []
        for entry in list(unit.entries):
            held = now - entry.opened_at
            holding.append(
                {
                    "resource": entry.res.name,
                    "held_s": round(held, 3),
                    "leak": entry.leak_reported is not None or (limit is not None and held > limit),
                    "acquired_at": [
                        f'File "{f}", line {n}, in {name}' for f, n, name in entry.stack or ()
                    ],
                }
            )
        in_flight.append(
            {
                "id": f"{id(unit):x}",  # stable while the unit lives: the page keeps its rows
                "label": unit.label,
                "age_s": round(now - unit.started, 3),
                "leak_threshold_s": limit,
                "holding": holding,
            }
        )
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "state": stats.state,
        "leak_threshold_s": threshold,
        "units": {
            "in_flight": stats.units_in_flight,
            "total": stats.units_total,
            "refused": stats.units_refused,
        },
        "resources": [
            {
                "name": r.name,
                "scope": r.scope,
                "in_use": r.in_use,
                "max_in_use": r.max_in_use,
                "opened": r.opened,
                "closed": r.closed,
                "open_errors": r.open_errors,
                "close_errors": r.close_errors,
                "timeouts": r.timeouts,
                "leaks": r.leaks,
                "mean_wait_ms": _ms(r.mean_wait_time),
                "max_wait_ms": _ms(r.max_wait_time),
                "mean_hold_ms": _ms(r.mean_hold_time),
                "max_hold_ms": _ms(r.max_hold_time),
                "down": r.down,
            }
            for r in stats.resources.values()
        ],
        "pools": [
            {
                "name": p.name,
                "max": p.max,
                "open": p.open,
                "in_use": p.in_use,
                "idle": p.idle,
                "waiting": p.waiting,
                "created": p.created,
                "discarded": p.discarded,
            }
            for p in stats.pools.values()
        ],
        "in_flight": in_flight,
    }


@functools.cache
def security_headers() -> dict[str, str]:
    """The page's Content-Security-Policy: its own inline style and script only (by their
    hashes), its JSON from its own origin, no frame may show it (clickjacking: a button
    that runs the checks), nothing else loaded; and the older ``X-Frame-Options``."""
    html = resources.files("tether").joinpath("dashboard.html").read_text(encoding="utf-8")

    def digest(tag: str) -> str:
        body = html.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        value = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        return f"'sha256-{value}'"

    policy = (
        f"default-src 'none'; style-src {digest('style')}; script-src {digest('script')}; "
        f"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        f"frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def page(stats_url: str, checks_url: str, refresh: float) -> str:
    """The dashboard's HTML, pointed at its two JSON endpoints."""
    html = resources.files("tether").joinpath("dashboard.html").read_text(encoding="utf-8")
    config = (
        f'data-stats="{_attr(stats_url)}" data-checks="{_attr(checks_url)}" '
        f'data-refresh="{refresh:g}"'
    )
    return html.replace("data-tether-config", config, 1)


def _attr(value: str) -> str:
    return (
        value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    )
