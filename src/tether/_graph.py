"""The dependency graph: validated before anything opens; gives the open order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._errors import DependencyCycleError, ScopeError, UnknownResourceError, closest
from ._resource import Resource


def resolve(resources: Mapping[str, Resource[Any]], extra: list[Resource[Any]]) -> None:
    """Bind every resource's parameters to resources; check names, scopes and cycles.

    *extra* are resources not in the registry (overrides) resolved against it too.
    """
    overrides = {id(r) for r in extra}
    for res in [*resources.values(), *extra]:
        deps = []
        for param in res.params:
            dep = resources.get(param)
            if dep is None:
                raise UnknownResourceError(_unknown_message(res, param, resources), name=param)
            if res.scope == "app" and dep.scope == "request" and id(res) in overrides:
                what = getattr(res.factory, "__qualname__", None) or repr(res.factory)
                msg = (
                    f"lc.override() of app resource {res.name!r}: the override's factory "
                    f"{what}() depends on request resource {dep.name!r}, which an app "
                    f"resource, living for the whole application, cannot hold. Give the "
                    f"override a value, or a factory of app resources only."
                )
                raise ScopeError(msg)
            if res.scope == "app" and dep.scope == "request":
                msg = (
                    f"App resource {res.name!r} depends on request resource {dep.name!r}: "
                    f"an app resource lives for the whole application and cannot hold a "
                    f"value that lives for one request. Make {dep.name!r} an app resource "
                    f'(scope="app"), or make {res.name!r} a request resource.'
                )
                raise ScopeError(msg)
            deps.append(dep)
        res.set_deps(tuple(deps))
    _check_cycles(resources, {r.name: r for r in extra})


def unknown_override_message(
    res: Resource[Any], factory: Any, param: str, resources: Mapping[str, Resource[Any]]
) -> str:
    """The message for a parameter of *factory*, given to ``lc.override(res, ...)``, that
    names no resource: the override's factory is named, not *res* (which has no such
    parameter)."""
    close = closest(param, resources)
    hint = f" Did you mean {close!r}?" if close else ""
    known = ", ".join(sorted(resources)) or "none"
    what = getattr(factory, "__qualname__", None) or repr(factory)
    return (
        f"lc.override() of resource {res.name!r}: the override's factory {what}() has a "
        f"parameter {param!r} that names no resource.{hint} Parameters of a factory name the "
        f"resources it depends on (registered: {known}): rename the parameter, or give it a "
        f"default to make it plain configuration."
    )


def _unknown_message(res: Resource[Any], param: str, resources: Mapping[str, Resource[Any]]) -> str:
    close = closest(param, resources)
    hint = f" Did you mean {close!r}?" if close else ""
    known = ", ".join(sorted(resources)) or "none"
    return (
        f"Resource {res.name!r} has a parameter {param!r} that names no resource.{hint} "
        f"Parameters of a resource name the resources it depends on (registered: {known}); "
        f"register {param!r} with @lc.resource, rename the parameter, or give it a default "
        f"to make it plain configuration."
    )


def _check_cycles(
    resources: Mapping[str, Resource[Any]], replaced: Mapping[str, Resource[Any]]
) -> None:
    """Raise on a cycle, following an override's dependencies instead of its target's."""
    WHITE, GREY, BLACK = 0, 1, 2
    color: dict[str, int] = dict.fromkeys(resources, WHITE)
    path: list[str] = []

    def visit(res: Resource[Any]) -> None:
        color[res.name] = GREY
        path.append(res.name)
        for dep in replaced.get(res.name, res).deps:
            state = color.get(dep.name, BLACK)
            if state == GREY:
                start = path.index(dep.name)
                raise DependencyCycleError([*path[start:], dep.name])
            if state == WHITE:
                visit(dep)
        path.pop()
        color[res.name] = BLACK

    for res in resources.values():
        if color[res.name] == WHITE:
            visit(res)


def app_order(
    resources: Mapping[str, Resource[Any]], overrides: Mapping[Resource[Any], Resource[Any]]
) -> list[Resource[Any]]:
    """App resources in a dependency order (dependencies first), registration order kept.

    An overridden resource's dependencies are its override's.
    """
    order: list[Resource[Any]] = []
    seen: set[str] = set()

    def visit(res: Resource[Any]) -> None:
        if res.name in seen:
            return
        seen.add(res.name)
        for dep in overrides.get(res, res).deps:
            visit(dep)
        order.append(res)

    for res in resources.values():
        if res.scope == "app":
            visit(res)
    return order
