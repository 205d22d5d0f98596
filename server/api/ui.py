"""Browser pages: a landing page at `/`, the routing playground at `/playground`, and `/docs` /
`/redoc` served without a CDN.

Everything a page loads comes from this server: the playground is plain HTML/CSS/JS shipped in
`server/static/` (package data), and the Swagger UI / ReDoc bundles come from the
`fastapi-offline` package, so the pages work on an air-gapped machine. The pages only call the
public API (and the admin API with a token the user types in); they add no server logic.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
STATIC_URL = "/static"
DOCS_ASSETS_URL = "/static-docs"

router = APIRouter(include_in_schema=False)


def docs_assets() -> Path:
    """The folder holding swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/playground")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "playground.html")


@router.get("/docs")
async def swagger(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    app: FastAPI = request.app
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC_URL}/favicon.svg",
    )


@router.get("/docs/oauth2-redirect")
async def swagger_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


@lru_cache(maxsize=1)
def _redoc_js() -> bytes:
    return (docs_assets() / "redoc.standalone.js").read_bytes()


@router.get(f"{DOCS_ASSETS_URL}/redoc.standalone.js")
async def redoc_js(request: Request) -> Response:
    """ReDoc's bundle, with the one URL it fetches from a CDN (the "redocly" logo in the side menu)
    pointed at this server's own icon, so /redoc makes no request outside the server."""
    root = request.scope.get("root_path", "")
    body = _redoc_js().replace(REDOC_CDN_LOGO, f"{root}{STATIC_URL}/favicon.svg".encode())
    return Response(body, media_type="text/javascript")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    app: FastAPI = request.app
    return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                          redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
                          redoc_favicon_url=f"{root}{STATIC_URL}/favicon.svg", with_google_fonts=False)


def install(app: FastAPI) -> None:
    """Add the pages and their static files. The app must be built with `docs_url=None,
    redoc_url=None` so FastAPI's CDN-backed pages do not shadow these."""
    app.include_router(router)
    app.mount(STATIC_URL, StaticFiles(directory=STATIC), name="static")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=docs_assets()), name="static-docs")
