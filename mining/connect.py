"""The one way the jobs connect to Ray.

- ``address`` given (``ray://host:10001``, ``host:6379`` or ``auto``): connect there.
- no ``address`` but ``RAY_ADDRESS`` set (e.g. under ``ray job submit``): Ray uses it.
- neither: start a private local Ray whose processes listen on 127.0.0.1 only (no dashboard).

``RAY_AUTH_MODE`` is never changed here: token authentication is whatever the user (or the
cluster) configured. Only the tests and CI set ``RAY_AUTH_MODE=disabled``, explicitly.
"""
from __future__ import annotations

import logging
import os
import sys
import time

LOCAL_IP = "127.0.0.1"


def connect(address: str | None = None, *, namespace: str | None = None, runtime_env: dict | None = None,
            quiet: bool = True, log_to_driver: bool = True, num_cpus: int | None = None,
            client_retries: int = 3) -> None:
    """``ray.init`` once per process (a no-op when already connected).

    Args:
        address: Ray address, or None (``RAY_ADDRESS``, else a new local Ray on 127.0.0.1).
        namespace: Ray namespace (named actors live in one).
        runtime_env: job-level runtime environment (not allowed with ``ray://`` for some fields).
        quiet: Ray's own logging at WARNING (no banner).
        log_to_driver: show actors' stdout/stderr here.
        num_cpus: CPUs of a *new local* Ray (ignored when connecting to a cluster).
        client_retries: tries for a ``ray://`` connection (2 s, 4 s between them).
    Raises:
        ConnectionError: the cluster at ``address`` cannot be reached.
    """
    import ray

    if ray.is_initialized():
        return
    kw: dict = {"namespace": namespace, "log_to_driver": log_to_driver}
    if quiet:
        kw["logging_level"] = logging.WARNING
    if runtime_env:
        kw["runtime_env"] = runtime_env
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        # Ray client: the head starts a per-client server process; on a loaded head that start can
        # fail transiently ("Starting Ray client server failed"), so connecting is retried.
        kw.pop("log_to_driver", None)
        for attempt in range(1, client_retries + 1):
            try:
                ray.init(address, **kw)
                return
            except ConnectionError as e:
                if attempt == client_retries:
                    raise
                print(f"note: Ray client connection failed ({str(e).strip().splitlines()[-1][:200]}); "
                      f"retrying ({attempt}/{client_retries})", file=sys.stderr)
                time.sleep(2 * attempt)
    if address:
        ray.init(address=address, **kw)
        return
    # a private local Ray: bound to the loopback interface, no dashboard
    ray.init(_node_ip_address=LOCAL_IP, include_dashboard=False, num_cpus=num_cpus, **kw)
