"""The HTTP inference service and review page (`patchcore serve`; needs `patchcore[serve]`).

`create_app(Service(source, ServeOptions(...)))` gives the FastAPI app; `serve(...)` runs it
with uvicorn. See docs/serve.md.
"""

from .app import ServeOptions, Service, check_exposure, create_app, is_loopback
from .server import BackgroundServer, default_db, serve

__all__ = ["BackgroundServer", "ServeOptions", "Service", "check_exposure", "create_app",
           "default_db", "is_loopback", "serve"]
