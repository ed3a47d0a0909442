"""Turns a results file into docs/benchmarks.md (markdown tables, ratios from the same run) and
PNG plots under docs/benchmarks/.

``python -m bench.report [RESULTS.json]`` (default: the newest file in bench/results/).
Text between ``<!-- notes:begin -->`` and ``<!-- notes:end -->`` in an existing
docs/benchmarks.md (profiles, before/after records) is kept as it is.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.apps import FLOOR, PEERS, VARIANTS
from bench.procs import DISTURBED

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
PLOTS = ROOT / "docs" / "benchmarks"
NOTES_BEGIN = "<!-- notes:begin -->"
NOTES_END = "<!-- notes:end -->"

TARGET_NULL_EXTRA_US = 5.0
TARGET_NONE_RATIO = 1.03
TARGET_HTTP_RATIO = 0.95
# The release-point mechanism alone, written by hand: what the targets ask of the design itself.
MECHANISM = "handler-floor"
MIN_CLEAN = 3


# --- statistics ----------------------------------------------------------------------------


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def enough(clean: int, total: int) -> bool:
    """Whether ``clean`` undisturbed cells of ``total`` are enough to stand for them: at least
    MIN_CLEAN, or half of them when there are fewer rounds than that."""
    return clean >= max(1, min(MIN_CLEAN, -(-total // 2)))


def undisturbed(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells during which other processes used at most DISTURBED of a CPU, if there are
    ``enough`` of them; else all of them."""
    clean = [s for s in samples if s.get("others", 0.0) <= DISTURBED]
    return clean if enough(len(clean), len(samples)) else samples


def values(samples: list[dict[str, Any]] | None, key: str) -> list[float]:
    return [s[key] for s in undisturbed(samples or []) if key in s]


def by_round(samples: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {s["round"]: s[key] for s in samples if key in s}


def paired(
    a: list[dict[str, Any]] | None,
    b: list[dict[str, Any]] | None,
    key: str,
    op: Callable[[float, float], float],
) -> list[float]:
    """``op(a, b)`` for every round both have: the same round shares the machine's speed.
    Rounds where either cell was disturbed are left out while ``enough`` pairs remain."""
    if not a or not b:
        return []
    ra, rb = by_round(a, key), by_round(b, key)
    rounds = sorted(ra.keys() & rb.keys())
    clean_a = {s["round"] for s in a if s.get("others", 0.0) <= DISTURBED}
    clean_b = {s["round"] for s in b if s.get("others", 0.0) <= DISTURBED}
    clean = [r for r in rounds if r in clean_a and r in clean_b]
    return [op(ra[r], rb[r]) for r in (clean if enough(len(clean), len(rounds)) else rounds)]


def disturbance(sec: dict[str, Any]) -> str:
    cells = [
        s for per_route in sec.get("samples", {}).values() for xs in per_route.values() for s in xs
    ]
    if not cells or not any("others" in s for s in cells):
        return ""
    bad = [s for s in cells if s.get("others", 0.0) > DISTURBED]
    if not bad:
        return "No cell was disturbed by other processes on the machine.\n"
    names: dict[str, int] = {}
    for s in bad:
        name = s.get("others_busiest", "")
        if name:
            names[name] = names.get(name, 0) + 1
    busiest = max(names, key=lambda n: names[n]) if names else ""
    return (
        f"{len(bad)} of {len(cells)} cells ran while other processes on the machine used more than "
        f"{DISTURBED:.0%} of a CPU (median {med(s['others'] for s in bad):.2f} CPU"
        + (f"; most often `{busiest}`" if busiest else "")
        + f"); they are left out wherever enough clean cells (or pairs) remain (at least "
        f"{MIN_CLEAN}, or half of them).\n"
    )


def med(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    """``median (p25–p75)``."""
    if not xs:
        return "–"
    lo, mid, hi = quantiles(xs)
    return f"{fmt.format(mid)} ({fmt.format(lo)}–{fmt.format(hi)})"


def variants_in(section: dict[str, Any]) -> list[str]:
    present = section.get("samples", {})
    return [v for v in VARIANTS if v in present]


def routes_in(section: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for per_route in section.get("samples", {}).values():
        for r in per_route:
            if r not in seen:
                seen.append(r)
    order = ["/none", "/null", "/pg", "/sqlite", "/graph7"]
    return sorted(seen, key=lambda r: order.index(r) if r in order else 99)


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


# --- the sections --------------------------------------------------------------------------


def inproc_tables(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    sec = res.get("inproc")
    if not sec or not sec.get("samples"):
        return "_Not run._\n", {}
    vs, rs = variants_in(sec), routes_in(sec)
    S = sec["samples"]
    facts: dict[str, Any] = {}

    def col(v: str, r: str, key: str) -> list[float]:
        return values(S.get(v, {}).get(r), key)

    lines = [
        f"{sec['rounds']} rounds; every cell is one (variant, route) for about "
        f"{sec.get('cell_seconds', 0) * 1000:.0f} ms of requests at concurrency 1; figures are "
        "the median over rounds and (p25–p75). " + disturbance(sec),
        "",
        "**CPU µs per request** (process CPU time ÷ requests):",
        "",
        table(["variant", *rs], [[v, *(spread(col(v, r, "cpu_us")) for r in rs)] for v in vs]),
        "",
        "**Wall µs per request:**",
        "",
        table(["variant", *rs], [[v, *(spread(col(v, r, "wall_us")) for r in rs)] for v in vs]),
        "",
        "**What a resource costs** (CPU µs, each paired with the same variant's `/none` in the "
        "same round), and each `/none` against FastAPI's own (`fastapi-manual`):",
        "",
    ]
    rows = []
    for v in vs:
        row = [v]
        for r in ("/null", "/graph7", "/pg", "/sqlite"):
            d = paired(S[v].get(r), S[v].get("/none"), "cpu_us", lambda a, b: a - b)
            row.append(spread(d, "{:+.1f}"))
            facts[f"{v} {r}-none"] = med(d)
        ratio = paired(
            S[v].get("/none"), S.get(FLOOR, {}).get("/none"), "cpu_us", lambda a, b: a / b
        )
        row.append(spread(ratio, "{:.3f}"))
        facts[f"{v} none/floor"] = med(ratio)
        rows.append(row)
    lines.append(
        table(
            [
                "variant",
                "/null − /none",
                "/graph7 − /none",
                "/pg − /none",
                "/sqlite − /none",
                f"/none ÷ {FLOOR} /none",
            ],
            rows,
        )
    )
    skipped = {**sec.get("skipped", {})}
    for v, pr in sec.get("route_problems", {}).items():
        for r, why in pr.items():
            skipped[f"{v} {r}"] = why
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- `{k}`: {why}" for k, why in skipped.items()]
    return "\n".join(lines) + "\n", facts


def http_tables(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    sec = res.get("http")
    if not sec:
        return "_Not run._\n", {}
    if sec.get("error"):
        return f"_Not run: {sec['error']}._\n", {}
    vs, rs = variants_in(sec), routes_in(sec)
    S = sec["samples"]
    facts: dict[str, Any] = {}

    def col(v: str, r: str, key: str) -> list[float]:
        return values(S.get(v, {}).get(r), key)

    lines = [
        "uvicorn (uvloop, httptools, one worker) pinned to CPU 0, wrk "
        f"(`-t1 -c{sec['connections']}`, "
        f"{sec['seconds']} s per run) and PostgreSQL pinned to CPU 1; {sec['rounds']} rounds, "
        "variants rotated each round. " + disturbance(sec),
        "",
        "**Requests per second** (median (p25–p75) over rounds):",
        "",
        table(
            ["variant", *rs], [[v, *(spread(col(v, r, "rps"), "{:.0f}") for r in rs)] for v in vs]
        ),
        "",
        "**Latency p50 / p99, ms** (medians over rounds):",
        "",
        table(
            ["variant", *rs],
            [
                [
                    v,
                    *(
                        (
                            f"{med(col(v, r, 'p50_ms')):.2f} / {med(col(v, r, 'p99_ms')):.2f}"
                            if col(v, r, "p50_ms") and col(v, r, "p99_ms")
                            else "–"
                        )
                        for r in rs
                    ),
                ]
                for v in vs
            ],
        ),
        "",
        "**Server CPU µs per request** (uvicorn process CPU ÷ requests served):",
        "",
        table(
            ["variant", *rs],
            [[v, *(spread(col(v, r, "server_cpu_us")) for r in rs)] for v in vs],
        ),
        "",
        "**Garbage collector in the server**: µs per request, and full (generation 2) "
        "collections per 1,000 requests. Work that allocates more than it frees between "
        "collections, or keeps a request's objects alive after it ends, shows here:",
        "",
        table(
            ["variant", *rs],
            [
                [
                    v,
                    *(
                        (
                            f"{med(col(v, r, 'server_gc_us')):.1f} µs, "
                            f"{med([g[2] for g in col(v, r, 'gc_per_1k')]):.2f}"
                            if col(v, r, "server_gc_us") and col(v, r, "gc_per_1k")
                            else "–"
                        )
                        for r in rs
                    ),
                ]
                for v in vs
            ],
        ),
        "",
        f"**Throughput ratios**: each variant ÷ `{FLOOR}`, paired by round:",
        "",
    ]
    rows = []
    for v in vs:
        row = [v]
        for r in rs:
            x = paired(S[v].get(r), S.get(FLOOR, {}).get(r), "rps", lambda a, b: a / b)
            row.append(spread(x, "{:.3f}"))
            facts[f"{v} {r} rps/floor"] = med(x)
        rows.append(row)
    lines.append(table(["variant", *rs], rows))
    peers = [p for p in PEERS if p in S]
    if "tether" in S and peers:
        lines += ["", "**tether ÷ each peer**, requests per second, paired by round:", ""]
        rows = []
        for p in peers:
            row = [p]
            for r in rs:
                x = paired(S["tether"].get(r), S[p].get(r), "rps", lambda a, b: a / b)
                row.append(spread(x, "{:.3f}"))
                facts[f"tether/{p} {r}"] = med(x)
            rows.append(row)
        lines.append(table(["tether ÷", *rs], rows))
    errors = [
        f"`{v} {r}`: {sum(s.get('non_2xx', 0) for s in S[v][r])} non-2xx, "
        f"{sum(s.get('socket_errors', 0) for s in S[v][r])} socket errors"
        for v in vs
        for r in S[v]
        if any(s.get("non_2xx") or s.get("socket_errors") for s in S[v][r])
    ]
    skipped = {**sec.get("skipped", {})}
    for v, pr in sec.get("route_problems", {}).items():
        for r, why in pr.items():
            skipped[f"{v} {r}"] = why
    if errors or skipped:
        lines += ["", "Errors and variants not measured:", ""]
        lines += [f"- {e}" for e in errors]
        lines += [f"- `{k}`: {why}" for k, why in skipped.items()]
    return "\n".join(lines) + "\n", facts


def memory_tables(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    sec = res.get("memory")
    if not sec:
        return "_Not run._\n", {}
    facts: dict[str, Any] = {}
    lines = []
    rss = sec.get("rss")
    if rss and rss.get("points"):
        pts = rss["points"]
        first, last = pts[0], pts[-1]
        growth = (last["rss"] - first["rss"]) / 2**20
        facts["rss_growth_mib"] = growth
        facts["rss_variant"] = rss["variant"]
        facts["rss_requests"] = last["requests"]
        lines += [
            f"RSS of `{rss['variant']}` serving `{rss['route']}` in-process, after a garbage "
            "collection at each checkpoint:",
            "",
            table(
                ["requests", "RSS MiB", "CPU s"],
                [[f"{p['requests']:,}", f"{p['rss'] / 2**20:.1f}", f"{p['cpu']:.1f}"] for p in pts],
            ),
            "",
            f"Growth from {first['requests']:,} to {last['requests']:,} requests: "
            f"**{growth:+.2f} MiB**"
            + (" (stopped early at its time bound)." if rss.get("stopped_early") else "."),
            "",
        ]
    elif rss and rss.get("error"):
        lines += [f"RSS: not measured: {rss['error']}", ""]
    tm = sec.get("tracemalloc", {})
    if tm:
        rows = []
        for v, t in tm.items():
            if "error" in t:
                rows.append([v, "–", "–", "–", t["error"]])
                continue
            facts[f"{v} retained_bytes"] = t["retained_bytes_per_request"]
            rows.append(
                [
                    v,
                    f"{t['peak_bytes_per_request'] / 1024:.1f}",
                    f"{t['retained_bytes_per_request']:+.2f}",
                    f"{t['retained_blocks_per_request']:+.3f}",
                    "; ".join(
                        f"{g['where']} {g['size_diff']:+d} B"
                        for g in t["top_growth"][:2]
                        if g["size_diff"] >= 1024
                    )
                    or "none ≥ 1 KiB",
                ]
            )
        route = sec.get("tracemalloc_route", "/null")
        lines += [
            f"tracemalloc, `{route}`: the peak of memory allocated while one request runs (above "
            "what was live before it), and what stays allocated per request after "
            f"{next(iter(tm.values())).get('n', 0):,} requests and a collection:",
            "",
            table(
                [
                    "variant",
                    "peak KiB / request",
                    "retained B / request",
                    "blocks / request",
                    "growth",
                ],
                rows,
            ),
            "",
        ]
    return "\n".join(lines) + "\n", facts


def stream_tables(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    sec = res.get("stream")
    if not sec:
        return "_Not run._\n", {}
    if sec.get("error"):
        return f"_Not run: {sec['error']}._\n", {}
    facts: dict[str, Any] = {}
    stream_s = sec["body_bytes"] / sec["rate_bytes_per_s"]
    lines = [
        f"Pool of {sec['pool_size']}, {sec['clients']} concurrent clients each reading a "
        f"{sec['body_bytes'] // 1024} KiB `StreamingResponse` at "
        f"{sec['rate_bytes_per_s'] / 1024:.0f} "
        f"KiB/s (about {stream_s:.1f} s per body); server SO_SNDBUF {sec['sndbuf']} B, client "
        f"SO_RCVBUF {sec['rcvbuf']} B; a connection waits at most {sec['acquire_timeout_s']:g} s "
        "for the pool. Case A: the handler queries, the stream does not. Case B: the stream "
        "queries while it streams. *Busy* connections are those PostgreSQL's `pg_stat_activity` "
        "shows active or idle in a transaction (sampled every 100 ms; *left* is after the "
        "clients finished); *held max* is counted by the app itself.",
        "",
    ]
    rows = []
    for key, r in sec["runs"].items():
        facts[key] = r
        rows.append(
            [
                key.split()[0],
                key.split(maxsplit=1)[1],
                f"{r['completed']} / {r['clients']}",
                str(r["truncated"]),
                str(r["status_5xx"]) + (f" ({r['status_503']} × 503)" if r["status_503"] else ""),
                f"{r['status_503_retry_after_in_time']}",
                f"{r['time_to_fail_median_s']:.2f}"
                if r["time_to_fail_median_s"] is not None
                else "–",
                str(r.get("app_held_max", "?")),
                str(r.get("pg_max_busy", "?")),
                str(r.get("pg_left_busy", "?")),
            ]
        )
    lines.append(
        table(
            [
                "case",
                "configuration",
                "completed",
                "truncated",
                "5xx",
                "503 + Retry-After in time",
                "time to fail s (median)",
                "held max",
                "busy max (pg)",
                "left busy (pg)",
            ],
            rows,
        )
    )
    if sec.get("skipped"):
        lines += ["", "Not run:", ""]
        lines += [f"- `{k}`: {why}" for k, why in sec["skipped"].items()]
    return "\n".join(lines) + "\n", facts


def targets(
    inproc: dict[str, Any], http: dict[str, Any], memory: dict[str, Any], stream: dict[str, Any]
) -> str:
    rows = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    def alone(x: float | None, fmt: str) -> str:
        return fmt.format(x) if x is not None else "—"

    x = inproc.get("tether /null-none")
    rows.append(
        [
            f"tether `/null` − tether `/none` ≤ {TARGET_NULL_EXTRA_US:g} µs CPU (in-process)",
            f"{x:+.1f} µs" if x is not None else "not measured",
            verdict(None if x is None else x <= TARGET_NULL_EXTRA_US),
            alone(inproc.get(f"{MECHANISM} /null-none"), "{:+.1f} µs"),
        ]
    )
    x = inproc.get("tether none/floor")
    rows.append(
        [
            f"tether `/none` ÷ {FLOOR} `/none` ≤ {TARGET_NONE_RATIO:g} (in-process CPU)",
            f"{x:.3f}" if x is not None else "not measured",
            verdict(None if x is None else x <= TARGET_NONE_RATIO),
            alone(inproc.get(f"{MECHANISM} none/floor"), "{:.3f}"),
        ]
    )
    for r in ("/null", "/pg"):
        x = http.get(f"tether {r} rps/floor")
        rows.append(
            [
                f"HTTP `{r}`: tether ≥ {TARGET_HTTP_RATIO:g} × {FLOOR}",
                f"{x:.3f}" if x is not None else "not measured",
                verdict(None if x is None else x >= TARGET_HTTP_RATIO),
                alone(http.get(f"{MECHANISM} {r} rps/floor"), "{:.3f}"),
            ]
        )
        peer_ratios = {p: http.get(f"tether/{p} {r}") for p in PEERS}
        got = {p: v for p, v in peer_ratios.items() if v is not None}
        rows.append(
            [
                f"HTTP `{r}`: tether ahead of every peer",
                ", ".join(f"{p} {v:.3f}" for p, v in got.items()) or "not measured",
                verdict(None if not got else all(v > 1 for v in got.values())),
                "",
            ]
        )
    a = stream.get("A tether-handler")
    if a:
        ok = a["completed"] == a["clients"] and (a.get("app_held_max") or 0) <= 5
        got = f"{a['completed']} / {a['clients']} completed, held at most {a.get('app_held_max')}"
    else:
        ok, got = None, "not measured"
    rows.append(
        [
            'Slow clients, case A (tether `release="handler"`): all complete, ≤ 5 held',
            got,
            verdict(ok),
            "",
        ]
    )
    b = stream.get("B tether-response")
    if b:
        refused = b["clients"] - b["completed"]
        ok = (
            b["truncated"] == 0
            and (b.get("pg_left_busy") or 0) == 0
            and (b.get("app_held_after") or 0) == 0
            and b["status_503_retry_after_in_time"] == refused
        )
        got = (
            f"{b['truncated']} truncated, {b.get('pg_left_busy')} left busy, "
            f"{b['status_503_retry_after_in_time']} of {refused} refused got 503 + Retry-After "
            "in time"
        )
    else:
        ok, got = None, "not measured"
    rows.append(
        [
            'Slow clients, case B (tether `release="response"`): none truncated, none left, '
            "503 + Retry-After within the acquire timeout",
            got,
            verdict(ok),
            "",
        ]
    )
    g = memory.get("rss_growth_mib")
    variant = memory.get("rss_variant")
    rows.append(
        [
            "No memory growth (RSS, tether `/null`)",
            f"{g:+.2f} MiB over {memory.get('rss_requests', 0):,} requests ({variant})"
            if g is not None
            else "not measured",
            verdict(None if g is None or variant != "tether" else g < 1.0),
            "",
        ]
    )
    head = ["target (issue 4)", "measured", "verdict", f"{MECHANISM}, same run"]
    return table(head, rows) + "\n"


# --- plots ---------------------------------------------------------------------------------


def plots(res: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    PLOTS.mkdir(parents=True, exist_ok=True)
    made = []

    def grouped(
        sec: dict[str, Any], key: str, title: str, ylabel: str, name: str, log: bool
    ) -> None:
        vs, rs = variants_in(sec), routes_in(sec)
        if not vs or not rs:
            return
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(vs)
        for i, v in enumerate(vs):
            meds, los, his = [], [], []
            for r in rs:
                xs = values(sec["samples"][v].get(r), key)
                if xs:
                    lo, mid, hi = quantiles(xs)
                else:
                    lo = mid = hi = float("nan")
                meds.append(mid)
                los.append(mid - lo)
                his.append(hi - mid)
            xs_pos = [j + (i - (len(vs) - 1) / 2) * width for j in range(len(rs))]
            ax.bar(xs_pos, meds, width, yerr=[los, his], label=v, capsize=2)
        ax.set_xticks(range(len(rs)), rs)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8, ncol=4)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(PLOTS / name, dpi=110)
        plt.close(fig)
        made.append(name)

    if res.get("inproc", {}).get("samples"):
        grouped(
            res["inproc"],
            "cpu_us",
            "In-process CPU time per request (median, p25–p75)",
            "CPU µs / request (log)",
            "inproc_cpu.png",
            True,
        )
    if res.get("http", {}).get("samples"):
        grouped(
            res["http"],
            "rps",
            "Over HTTP: requests per second (median, p25–p75)",
            "requests / s",
            "http_rps.png",
            False,
        )
    rss = res.get("memory", {}).get("rss")
    if rss and rss.get("points"):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        pts = rss["points"]
        ax.plot([p["requests"] for p in pts], [p["rss"] / 2**20 for p in pts], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("requests served")
        ax.set_ylabel("RSS MiB")
        ax.set_title(f"RSS of {rss['variant']} {rss['route']} (in-process)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(PLOTS / "memory_rss.png", dpi=110)
        plt.close(fig)
        made.append("memory_rss.png")
    runs = res.get("stream", {}).get("runs")
    if runs:
        keys = list(runs)
        fig, ax = plt.subplots(figsize=(9, 4.4))
        bottom = [0.0] * len(keys)
        parts: list[tuple[str, Callable[[dict[str, Any]], int], str]] = [
            ("completed", lambda r: r["completed"], "#4c9f50"),
            ("truncated", lambda r: r["truncated"], "#e0a030"),
            ("503 + Retry-After", lambda r: r["status_503_retry_after_in_time"], "#7a7ad0"),
            (
                "other 5xx",
                lambda r: r["status_5xx"] - r["status_503_retry_after_in_time"],
                "#c84040",
            ),
        ]
        for label, get, color in parts:
            vals = [get(runs[k]) for k in keys]
            ax.bar(range(len(keys)), vals, bottom=bottom, label=label, color=color)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_xticks(range(len(keys)), [k.replace(" ", "\n", 1) for k in keys], fontsize=8)
        ax.set_ylabel("clients")
        ax.set_title("Slow clients on a stream: how each response ended")
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        fig.tight_layout()
        fig.savefig(PLOTS / "stream.png", dpi=110)
        plt.close(fig)
        made.append("stream.png")
    return made


# --- the document --------------------------------------------------------------------------


def kept_notes() -> str:
    if DOC.exists():
        m = re.search(
            re.escape(NOTES_BEGIN) + r"(.*?)" + re.escape(NOTES_END), DOC.read_text(), re.S
        )
        if m:
            return m.group(1).strip("\n")
    return (
        "_Profiles of tether's hot path and the before/after of each fix go here; "
        "`python -m bench.run --profile tether:/null` writes a pyinstrument profile._"
    )


def render(res: dict[str, Any], images: list[str]) -> str:
    meta = res.get("meta", {})
    inproc_md, inproc = inproc_tables(res)
    http_md, http = http_tables(res)
    memory_md, memory = memory_tables(res)
    stream_md, stream = stream_tables(res)
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())

    def image(name: str, alt: str) -> str:
        return f"\n![{alt}](benchmarks/{name})\n" if name in images else ""

    return f"""# Benchmarks

Generated by `python -m bench.run{" --quick" if meta.get("mode") == "quick" else ""}` \
({meta.get("mode", "?")} mode) on {meta.get("started", "?")}, \
in {meta.get("duration_s", 0):.0f} s, \
from `{meta.get("results_file", "?")}`. Do not edit the tables by hand: rerun `make bench` \
(or `python -m bench.report FILE`).

Machine: {meta.get("cpu", "?")}, {meta.get("nproc", "?")} CPUs. {versions}.

Every variant serves the same routes with the same resources (`bench/apps/`): `/none` (no
resource), `/null` (a request resource that is a trivial object from a generator: pure
overhead), `/pg` (asyncpg pool of 10, `SELECT 1`), `/sqlite` (aiosqlite, a pool of 2, one tiny
SELECT), `/graph7` (seven request resources shaped like wireup's cross-library benchmark: C..G
plain, H a sync context manager, I an async one; C asked for three times, D twice; FastAPI's
`Depends` runs the sync H in a worker thread, two thread hops per request; tether declares it
`thread=False` (it does no I/O), so it runs on the event loop, as the peers call it).
`starlette-raw` and `fastapi-manual` write acquire/release by hand; `fastapi-yield` uses
`Depends` on async generators; the peers use their documented FastAPI integrations. On this
2-core machine the CPU speed drifts about 2x in phases, so every figure comes from many short
cells interleaved across variants, and every ratio or difference is paired within one round.

## Targets

{targets(inproc, http, memory, stream)}
The last column is the same figure for `{MECHANISM}`: tether's release-point mechanism written
by hand, with none of its bookkeeping (`bench/apps/handler_floor.py`), measured in the same run.
What the public contract's own bookkeeping adds to it (the counters and timings of `lc.stats()`,
the registry of units of work, the check before a shielded close) is measured on demand by
`features-floor`: see the eighth round in the notes below; what compiling tether's request path
with mypyc would buy, the ninth.

## In-process (ASGI driver, concurrency 1)

{inproc_md}{image("inproc_cpu.png", "in-process CPU per request")}
## Over HTTP

{http_md}{image("http_rps.png", "HTTP requests per second")}
## Memory

{memory_md}{image("memory_rss.png", "RSS over requests")}
## Slow clients on a stream (scenario 5)

{stream_md}{image("stream.png", "slow clients outcome")}
## Notes

{NOTES_BEGIN}
{kept_notes()}
{NOTES_END}
"""


def newest_results() -> Path | None:
    files = sorted(RESULTS.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def write(results_file: Path) -> Path:
    res = json.loads(results_file.read_text())
    res.setdefault("meta", {})["results_file"] = str(results_file.relative_to(ROOT))
    images = plots(res)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(res, images))
    return DOC


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(
            "usage: python -m bench.report [RESULTS.json]\n\nWrites docs/benchmarks.md and "
            "its plots from a results file (default: the newest in bench/results/)."
        )
        return
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else newest_results()
    if path is None:
        sys.exit("no results in bench/results/: run python -m bench.run first")
    print(f"wrote {write(path.resolve())}")


if __name__ == "__main__":
    main()
