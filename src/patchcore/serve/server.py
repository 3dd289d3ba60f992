"""Run the service with uvicorn: `serve` is what `patchcore serve` calls."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..config import RuntimeSettings
from ..storage import is_model_folder
from .app import ServeOptions, Service, check_exposure, create_app

log = logging.getLogger(__name__)


def default_db(source: str | os.PathLike) -> Path:
    """The review database beside the served models: `MODEL.reviews.sqlite` next to a model
    folder, `reviews.sqlite` inside a results folder (never inside a model folder, whose saves
    refuse foreign files)."""
    source = Path(source).resolve()
    if is_model_folder(source):
        return source.parent / f"{source.name}.reviews.sqlite"
    return source / "reviews.sqlite"


def serve(source: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          options: ServeOptions | None = None, settings: RuntimeSettings | None = None) -> None:
    """Load the models under `source` and answer HTTP requests until interrupted.

    ConfigError before anything is loaded when `host` is not loopback and no API key is set;
    ModelFileError when `source` holds no loadable model.
    """
    import uvicorn

    options = options or ServeOptions()
    check_exposure(host, options.api_key)
    service = Service(source, options, settings)
    app = create_app(service)
    log.info("serving %s on http://%s:%d (review database %s)",
             ", ".join(sorted(service.registry.entries)), host, port, options.db)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            limit_concurrency=4 * options.queue_size + 32,
                            timeout_keep_alive=5)
    uvicorn.Server(config).run()


class BackgroundServer:
    """A uvicorn server for `app` on a free loopback port in a thread (tests, benchmarks).

    `with BackgroundServer(app) as url:` yields the base URL and stops the server on exit.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 start_timeout: float = 30.0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.start_timeout = start_timeout
        self.thread: threading.Thread | None = None

    def __enter__(self) -> str:
        thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                  daemon=True)
        thread.start()
        self.thread = thread
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server at {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)
        self.sock.close()
