"""User-facing errors and how they cross Ray.

Errors meant for the person at the terminal (a bad setting, missing weights, a bad query,
a bad labels file) carry a one-line message. Ray wraps them on the way back:

- a task or actor method that raised comes back as ``ray.exceptions.RayTaskError``; its
  ``.cause`` is the original exception (and ``str()`` is a multi-line remote traceback);
- an actor whose ``__init__`` raised comes back as ``ActorDiedError``, which keeps only the
  text: the original ``<Class>: <message>`` line is found in it.

:func:`user_error` undoes both, so every CLI prints the original one line and exits 2.
"""
from __future__ import annotations

import re


class SettingsError(ValueError):
    """A setting is wrong (unknown name, out-of-range number, unusable input or output path).

    Raised by the driver before any work starts; the message is one line naming the option.
    """


class StartupTimeout(RuntimeError):
    """No worker actor could start within ``--startup-timeout`` seconds (cluster resources busy)."""


USER_ERRORS = ("SettingsError", "WeightsError", "QueryError", "LabelsError", "StartupTimeout")
_LINE = re.compile(r"(?:[\w.]+\.)?(" + "|".join(USER_ERRORS) + r"): (.+)")


def _user_types() -> tuple[type, ...]:
    from mining.embed import WeightsError
    from mining.feedback import LabelsError
    from mining.query import QueryError

    return (SettingsError, StartupTimeout, WeightsError, QueryError, LabelsError)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside ``exc`` (itself, a Ray wrapper's cause, or parsed from an
    actor-death message), or None when ``exc`` is a bug / infrastructure failure.

    The returned exception's ``str()`` is the one-line message to print.
    """
    types = _user_types()
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        seen += 1
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException) and cause is not e:
            e = cause                                   # RayTaskError(.cause): the original exception
            continue
        if isinstance(e, types):
            return e
        break
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover - ray is a dependency
        RayActorError = ()  # type: ignore[assignment]
    if isinstance(exc, RayActorError) or isinstance(e, RayActorError):
        text = str(e if isinstance(e, RayActorError) else exc)
        hits = [m for m in (_LINE.search(line.strip()) for line in text.splitlines()) if m]
        if hits:
            name, msg = hits[-1].group(1), hits[-1].group(2).strip()
            cls = {t.__name__: t for t in types}.get(name, SettingsError)
            return cls(msg)
    return None


def one_line(exc: BaseException) -> str:
    """``error: <message>`` for a user error (first line only), else ``error: <Class>: <message>``."""
    ue = user_error(exc)
    if ue is not None:
        msg = str(ue).strip().splitlines()[0] if str(ue).strip() else type(ue).__name__
        return f"error: {msg}"
    lines = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {lines[-1] if lines else ''}"
