"""`thttpx.client(http1=...)` reaches the transports tether builds (the direct route's and
each proxy's), as it reaches httpx's own: it used to be passed to httpx.AsyncClient only,
which builds no transport when given one, so it was silently ignored."""

import httpx
import pytest

import tether
from tether.integrations import httpx as thttpx

pytestmark = pytest.mark.anyio


def takes_http1(transport: httpx.AsyncBaseTransport) -> bool:
    """Whether the connections of *transport* (tether's, around httpx's own) speak HTTP/1.1:
    httpcore's pool hands its ``http1`` to each connection it makes."""
    inner = getattr(transport, "inner", transport)
    return bool(inner._pool._http1)  # type: ignore[attr-defined]


async def test_http1_reaches_the_transports_tether_builds() -> None:
    for http1 in (False, True):
        lc = tether.Lifecycle()
        http = thttpx.client(
            lc,
            base_url="http://upstream.test",
            http1=http1,
            proxy="http://proxy.test:3128",
            trust_env=False,
        )
        async with lc.run(), lc.scope() as s:
            c = await s.get(http)
            routes = [c._transport, *(t for t in c._mounts.values() if t is not None)]
            assert len(routes) == 2  # the direct route's, and the proxy's
            assert [takes_http1(t) for t in routes] == [http1, http1]
            # As httpx's own client builds them.
            async with httpx.AsyncClient(http1=http1, proxy="http://proxy.test:3128") as plain:
                assert takes_http1(plain._transport) is http1
