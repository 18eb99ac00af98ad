"""``raydistill serve``'s lifecycle in this process: start Ray Serve on ``serve.host:serve.port``
with the A/B application (``serve.app.build_app``), print where it serves, wait until Ctrl-C or
SIGTERM, then shut Serve down (on a ``RAY_ADDRESS`` cluster: delete only this application) and
Ray. It checks nothing beforehand (``serve.app.serve_problems`` and the CLI do) and exits nothing:
the CLI turns its outcome into exit codes.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

from ..config import Config
from . import AB_MODEL, ARMS
from .app import arm_refs


def interrupt(signum, frame) -> None:
    """A signal handler that stops the command as Ctrl-C does (raises KeyboardInterrupt)."""
    raise KeyboardInterrupt


def serve_until_stopped(cfg: Config, echo: Callable[..., None]) -> bool:
    """Serve ``cfg``'s application on the Ray this process has joined until Ctrl-C or SIGTERM
    (``interrupt``, installed after ``ray.init``; the teardown ignores a second SIGTERM and
    restores the previous handler), then shut down as the module docstring says.

    Args:
        echo: prints a message, ``echo(text)`` to stdout (the serving banner: URL, models, key,
            health route) and ``echo(text, err=True)`` to stderr ("stopping: ...").
    Returns:
        True when the application was up before the stop, False when it was stopped while starting.
    Raises:
        models.ModelError: an arm's model cannot be resolved (after the teardown).
    """
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    name = cfg.serve.app_name
    started = False
    original_sigterm = None
    try:
        from ray import serve as ray_serve

        from ..runtime import init_ray
        from .app import build_app

        init_ray()
        # SIGTERM (systemd, docker stop, Kubernetes, `ray job stop`) stops like Ctrl-C; set after
        # ray.init, whose own handler dumped the stack and exited 134
        original_sigterm = signal.signal(signal.SIGTERM, interrupt)
        app_ = build_app(cfg)  # models.ModelError: raised after the teardown below
        ray_serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        t0 = time.perf_counter()
        ray_serve.run(app_, name=name, route_prefix="/")
        started = True
        url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
        refs = arm_refs(cfg)
        weights = ", ".join(f"{cfg.serve.ab.weights.get(a, 0.0):g} {a}" for a in ARMS)
        echo(f"serving {name} at {url} (ready in {time.perf_counter() - t0:.0f} s); models:\n"
             + "".join(f"  {a}: {refs[a]}\n" for a in ARMS)
             + f"  {AB_MODEL}: weights {weights}, sticky on header {cfg.serve.ab.sticky_header}\n"
             + (f"API key: required (Authorization: Bearer, the value of ${cfg.serve.api_key_env})\n"
                if cfg.serve.api_key_env else "API key: none (serve.api_key_env unset; loopback only)\n")
             + f"health: http://{cfg.serve.host}:{cfg.serve.port}/health; Ctrl-C stops")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        echo("stopping: " + ("deleting the application" if on_cluster else "shutting Ray Serve down"), err=True)
    finally:
        import ray

        # a second SIGTERM (an impatient supervisor) must not cut the teardown short
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                from ray import serve as ray_serve

                try:
                    if on_cluster:
                        ray_serve.delete(name)
                    else:
                        ray_serve.shutdown()
                finally:
                    ray.shutdown()
        finally:
            signal.signal(signal.SIGTERM, previous if original_sigterm is None else original_sigterm)
    return started
