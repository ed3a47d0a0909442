"""An app module that registers its Lifecycle's Prometheus metrics at import, as a service
does: `tether check` of it must not write to the service's multiprocess directory."""

import tether
import tether.metrics.prometheus

lc = tether.Lifecycle()


@lc.resource(scope="app")
def settings() -> dict[str, str]:
    return {"region": "eu"}


tether.metrics.prometheus.register(lc)
