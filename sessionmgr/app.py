"""The Litestar application factory: `create_app(container=None)` is the one way in."""

from __future__ import annotations

from dependency_injector.ext.starlette import Lifespan
from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

import sessionmgr
from sessionmgr.api.append_lane import install as install_append_lane
from sessionmgr.api.bridge import forget_at_shutdown, freeze_startup_heap, resolve_at_startup
from sessionmgr.api.changes import ChangesController
from sessionmgr.api.health import HealthController
from sessionmgr.api.lane import install as install_read_lane
from sessionmgr.api.metrics import metrics_endpoint, metrics_middleware
from sessionmgr.api.openapi import complete_openapi
from sessionmgr.api.problem_types import problem_types_page
from sessionmgr.api.problems import EXCEPTION_HANDLERS
from sessionmgr.api.replayed import replayed_middleware
from sessionmgr.api.security import authentication_middleware
from sessionmgr.api.sessions import SessionController
from sessionmgr.api.tracing import add_request_id, tracing_middleware
from sessionmgr.container import Container, build_container
from sessionmgr.telemetry import configure_logging
from sessionmgr.ui.wiring import redoc_plugin, template_config, ui_handlers, ui_state


def create_app(container: Container | None = None) -> Litestar:
    """Build the app around `container` (a fresh one from the environment when None)."""
    container = container or build_container()
    settings = container.settings()
    configure_logging(settings.log_level)
    # With a metrics port, /metrics is served there only (sessionmgr.api.metrics.serve_metrics).
    metrics_route = [metrics_endpoint] if settings.metrics_port is None else []
    app = Litestar(
        route_handlers=[
            SessionController,
            ChangesController,
            HealthController,
            problem_types_page,
            *metrics_route,
            *ui_handlers(settings),
        ],
        lifespan=[Lifespan(container)],  # opens the resources before on_startup runs
        on_startup=[resolve_at_startup, complete_openapi, freeze_startup_heap],
        on_shutdown=[forget_at_shutdown],
        state=State(
            {
                "container": container,
                "metrics": container.metrics(),
                "tracer": container.tracer(),
                **ui_state(settings),
            }
        ),
        template_config=template_config(),
        middleware=[
            metrics_middleware,
            tracing_middleware,
            authentication_middleware,  # and the rate limit
            replayed_middleware,
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        before_send=[add_request_id],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="sessionmgr",
            version=sessionmgr.__version__,
            description="Shared working state of multi-agent sessions.",
            path="/schema",
            use_handler_docstrings=True,  # each handler's docstring is its description
            render_plugins=[redoc_plugin()],  # its script from /static: no CDN
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")
                }
            ),
        ),
        logging_config=None,
        debug=False,
    )
    install_read_lane(app)  # a plain session read skips the request cycle (its docstring)
    install_append_lane(app, settings.max_body_bytes)  # and so does a plain append
    return app
