"""tether's error messages, as anchored patterns for `pytest.raises(match=...)`."""

from __future__ import annotations

import re


def exactly(message: str) -> str:
    """An anchored pattern matching *message* and nothing else."""
    return f"^{re.escape(message)}$"


def startup(resource: str, cause: str, timeout: str = "timeout=") -> str:
    """*timeout*: the option that bounds the resource's open (an integration's own)."""
    return exactly(
        f"App resource {resource!r} failed to open: {cause}. The resources already open were "
        f"closed. Fix the cause above, or give {resource!r} retries= or a longer {timeout} if "
        f"it is slow to come up."
    )


def misconfigured(resource: str, cause: str) -> str:
    """The StartupError of a configuration or code mistake (no retry advice)."""
    return exactly(
        f"App resource {resource!r} failed to open: {cause}. The resources already open were "
        f"closed. Fix the cause above: a mistake in the configuration or the code, which no "
        f"retry mends."
    )


def cycle(*path: str) -> str:
    return exactly(
        f"Dependency cycle between resources: {' -> '.join(path)}. A resource cannot depend on "
        f"itself, directly or through others: remove one of these parameters or pass the value "
        f"another way."
    )


def unknown(owner: str, param: str, hint: str, registered: str) -> str:
    return exactly(
        f"Resource {owner!r} has a parameter {param!r} that names no resource.{hint} "
        f"Parameters of a resource name the resources it depends on "
        f"(registered: {registered}); register {param!r} with @lc.resource, rename the "
        f"parameter, or give it a default to make it plain configuration."
    )


def open_timeout(resource: str, seconds: str) -> str:
    return (
        f"Resource {resource!r} did not open within {seconds} s (its timeout=). Check that its "
        f"backend is reachable and not saturated, or raise the timeout."
    )


def close_timeout(resource: str, seconds: str) -> str:
    return exactly(
        f"Closing resource {resource!r} took longer than close_timeout={seconds} s and was "
        f"cut short: what it waited on was cancelled (the integrations' drivers cancel a "
        f"statement on the server: a COMMIT waiting for a lock there is rolled back), and its "
        f"connection may not have been returned in a known state. Look for a cleanup that "
        f"waits on the network (a COMMIT waiting for a lock), or for a task still using the "
        f"value after its unit of work ended (one not awaited), or raise close_timeout."
    )


def unit_ended(resource: str, label: str) -> str:
    return exactly(
        f"Cannot open resource {resource!r}: {label} has already ended. "
        f"Open a new `async with lc.scope()` for work that outlives it."
    )


# rolled_back(): units of work taking turns on the block's one connection.
def nested_message(name: str) -> str:
    return (
        f"rolled_back(): a unit of work asked for {name!r} while this task already holds it "
        f"in the block (an `lc.scope()` opened inside a request or scope that has it). In "
        f"production it gets another connection of the pool; in rolled_back() every unit of "
        f"work shares the block's one connection, so it would wait for itself. Pass the "
        f"connection (or session) the outer unit of work has to the inner code, or test it "
        f"without rolled_back()."
    )


def waited_message(name: str, timeout: float) -> str:
    return (
        f"rolled_back(): a unit of work waited {timeout:g}s (the pool's acquire timeout) for "
        f"{name!r} while another unit of work of the block held it, and no other got a turn "
        f"meanwhile. In production it gets another connection of the pool; in rolled_back() "
        f"the units of work share the block's one connection and take turns, so one the holder "
        f"waits for (a job in its own `lc.scope()` that an endpoint awaits, with asyncio.gather "
        f"or a task) never gets it, and one behind a holder slower than that fails. Pass the "
        f"endpoint's connection (or session) to the job, or test it without rolled_back()."
    )


# check_bool (tether._errors): an on/off option that is not a bool; *kind*: "a str", "an int".
def not_a_bool(where: str, option: str, value: object, kind: str, *, none: bool = False) -> str:
    hint = ""
    if isinstance(value, str):
        hint = (
            f" (a setting read from the environment is a string, and {value!r} would count as "
            f'true: convert it, e.g. {option}=os.environ.get(...) == "1")'
        )
    return exactly(
        f"{where}: {option}={value!r} is {kind}, not a bool. Pass True or False"
        f"{' (or None)' if none else ''}{hint}."
    )
