"""Connecting to Ray: the optional dependency, the session, and what the workers need.

Ray is imported only here and in the modules of this package, never by the rest of patchcore;
a missing `ray` is one line naming the extra to install.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

# What the workers run with: passive OpenMP waits, so that the thread pools of the several actors
# (and tasks) that share a node's cores do not spin against each other.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def require_ray() -> Any:
    """The `ray` module (with Ray Data); ConfigError naming the extra when it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--ray needs the ray extra ({exc.name} is missing): "
                          "pip install 'patchcore[ray]'") from None
    return ray


@contextlib.contextmanager
def session(address: str | None = None, progress: bool = True) -> Iterator[Any]:
    """A connected Ray, yielded as the `ray` module.

    Uses the Ray already initialised in this process if there is one (tests, notebooks);
    otherwise connects to `address` ("auto", "HOST:6379", "ray://HOST:10001"), or, when it is
    None or empty, to $RAY_ADDRESS or a new local instance, and disconnects at the end.
    Worker logs reach this terminal only when `progress` is on.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=progress,
                 runtime_env={"env_vars": dict(WORKER_ENV)})
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "a local instance"
        raise ConfigError(f"cannot start or reach Ray at {where}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                          ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def quiet_ray_data(progress: bool) -> None:
    """Ray Data's own progress bars off (we show one bar); its info logs off when quiet."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = progress
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_cpus(ray: Any) -> int:
    """CPUs of the connected cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
