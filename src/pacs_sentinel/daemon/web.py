"""The review worklist page: Starlette + Jinja2 templates, served by uvicorn in a daemon thread.

Access (``[review.web]``): on a loopback address without a token the page is open to local
users; with a token (``token`` in the file, or ``$SENTINEL_REVIEW_TOKEN``, which wins) every
request must carry it, as ``Authorization: Bearer <token>`` or as the cookie the login form
sets; anything else gets 401. Bound to any other address without a token, the daemon refuses
to start (:func:`check_web_access`). A POST whose Origin is another site gets 403.
"""

from __future__ import annotations

import datetime
import hmac
import io
import ipaddress
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from pacs_sentinel.daemon import monitoring
from pacs_sentinel.daemon.config import ReviewConfig, ReviewWebConfig
from pacs_sentinel.daemon.review import (
    Decision,
    ReviewError,
    ReviewInputError,
    ReviewStatus,
    ReviewStore,
    explain_reason,
    parse_since,
    viewer_link,
)
from pacs_sentinel.daemon.table import score_text
from pacs_sentinel.errors import ConfigError, SentinelError

log = structlog.get_logger(__name__)

#: Environment variable holding the page's access token (wins over ``[review.web] token``).
TOKEN_ENV = "SENTINEL_REVIEW_TOKEN"
#: Name of the cookie the login form sets.
COOKIE_NAME = "sentinel_review_token"
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
TEMPLATES.env.filters["score"] = score_text
START_TIMEOUT_SECONDS = 10.0


def review_token(web: ReviewWebConfig) -> str:
    """The access token: ``$SENTINEL_REVIEW_TOKEN`` when set, else ``[review.web] token`` ('' = none)."""
    return os.environ.get(TOKEN_ENV, "").strip() or web.token.strip()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_web_access(web: ReviewWebConfig) -> None:
    """Refuse a page reachable from other machines without a token.

    Raises:
        ConfigError: ``[review.web]`` is enabled on a non-loopback host and no token is set.
    """
    if web.enabled and not is_loopback(web.host) and not review_token(web):
        raise ConfigError([
            f"review.web.token: the review page is bound to {web.host!r}, which is not a loopback address; "
            f"set a token (review.web.token or ${TOKEN_ENV}) or bind it to 127.0.0.1"
        ])


def _age(timestamp: float) -> str:
    seconds = max(0.0, time.time() - timestamp)
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def build_app(store: ReviewStore, review: ReviewConfig, token: str) -> Starlette:
    """The page's application.

    Args:
        store: The worklist.
        review: ``[review]`` (viewer link template).
        token: The access token; '' serves without login (loopback only, see :func:`check_web_access`).
    """

    def authorised(request: Request) -> bool:
        if not token:
            return True
        header = request.headers.get("authorization", "")
        offered = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE_NAME, "")
        return bool(offered) and hmac.compare_digest(offered.encode(), token.encode())

    def login_page(request: Request, message: str | None = None) -> Response:
        return TEMPLATES.TemplateResponse(request, "login.html", {"message": message, "next": request.url.path},
                                          status_code=401)

    def cross_site(request: Request) -> bool:
        # A form on another site posting to this page (with the reviewer's cookie, or to an
        # open loopback page) carries that site's Origin: refuse it.
        origin = request.headers.get("origin")
        if request.method != "POST" or not origin:
            return False
        return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()

    def guarded(handler):  # type: ignore[no-untyped-def]
        async def endpoint(request: Request) -> Response:
            if cross_site(request):
                return Response("cross-site request refused", status_code=403, media_type="text/plain")
            if not authorised(request):
                return login_page(request)
            return await handler(request)
        return endpoint

    async def worklist(request: Request) -> Response:
        status = request.query_params.get("status", "open")
        try:
            items = store.items(status=None if status == "all" else status, order="priority")
        except ReviewError as exc:
            return Response(str(exc), status_code=400, media_type="text/plain")
        return TEMPLATES.TemplateResponse(request, "worklist.html", {
            "items": items, "status": status, "statuses": ["open", "claimed", "resolved", "all"], "age": _age,
        })

    def _item(request: Request) -> Any:
        return store.get(int(request.path_params["item_id"]))

    def case_page(request: Request, item: Any, *, error: str | None = None, status_code: int = 200) -> Response:
        overlays = list(range(1, len(item.overlay_paths()) + 1))
        return TEMPLATES.TemplateResponse(request, "case.html", {
            "item": item, "reasons": [explain_reason(r) for r in item.reasons], "overlays": overlays,
            "viewer": viewer_link(review.viewer_url, item.study_uid), "decisions": [d.value for d in Decision],
            "resolved": item.status is ReviewStatus.RESOLVED, "error": error, "age": _age,
        }, status_code=status_code)

    async def case(request: Request) -> Response:
        try:
            return case_page(request, _item(request))
        except ReviewError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")

    async def overlay(request: Request) -> Response:
        try:
            item = _item(request)
        except ReviewError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        number = int(request.path_params["number"])  # 1-based position in overlay_paths()
        paths = item.overlay_paths()
        if not 1 <= number <= len(paths):
            return Response("no such overlay", status_code=404, media_type="text/plain")
        return FileResponse(paths[number - 1], media_type="image/png")

    async def act(request: Request) -> Response:
        item_id = int(request.path_params["item_id"])
        form = await request.form()
        reviewer = str(form.get("reviewer", ""))
        try:
            if request.path_params["action"] == "claim":
                store.claim(item_id, reviewer)
                target = f"/items/{item_id}"
            else:
                store.resolve(item_id, str(form.get("decision", "")), reviewer, str(form.get("comments", "")))
                target = "/"
        except ReviewError as exc:
            try:
                # A wrong value in the form is a bad request; an item claimed or resolved meanwhile, a conflict.
                return case_page(request, store.get(item_id), error=str(exc),
                                 status_code=400 if isinstance(exc, ReviewInputError) else 409)
            except ReviewError:
                return Response(str(exc), status_code=404, media_type="text/plain")
        log.info("review item updated", item_id=item_id, action=request.path_params["action"], reviewer=reviewer)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie("sentinel_reviewer", reviewer.strip(), samesite="strict", httponly=True)
        return response

    def _window(request: Request) -> tuple[float, float]:
        now = time.time()
        return parse_since(request.query_params.get("since", "7d"), now=now), now

    async def report(request: Request) -> Response:
        try:
            since, now = _window(request)
        except ReviewError as exc:
            return Response(str(exc), status_code=400, media_type="text/plain")
        figures = await run_in_threadpool(monitoring.build_report, store.database, since, now)
        return TEMPLATES.TemplateResponse(request, "report.html", {
            "report": figures, "since": request.query_params.get("since", "7d"),
            "when": lambda t: datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC"),
        })

    async def report_chart(request: Request) -> Response:
        try:
            since, now = _window(request)
        except ReviewError as exc:
            return Response(str(exc), status_code=400, media_type="text/plain")

        def draw() -> bytes:
            figures = monitoring.build_report(store.database, since, now)
            bucket, series = monitoring.flag_rate_series(figures.window, since, now)
            buffer = io.BytesIO()
            monitoring.render_flag_rate_chart(series, buffer, bucket=bucket)
            return buffer.getvalue()

        return Response(await run_in_threadpool(draw), media_type="image/png")

    async def login(request: Request) -> Response:
        if cross_site(request):
            return Response("cross-site request refused", status_code=403, media_type="text/plain")
        if request.method == "GET":
            if authorised(request):
                return RedirectResponse("/", status_code=303)
            return login_page(request)
        form = await request.form()
        offered = str(form.get("token", ""))
        if not token or not hmac.compare_digest(offered.encode(), token.encode()):
            return login_page(request, "Wrong token.")
        target = str(form.get("next", "/"))
        response = RedirectResponse(target if target.startswith("/") and not target.startswith("//") else "/",
                                    status_code=303)
        response.set_cookie(COOKIE_NAME, token, httponly=True, samesite="strict")
        return response

    return Starlette(routes=[
        Route("/", guarded(worklist)),
        Route("/items/{item_id:int}", guarded(case)),
        Route("/items/{item_id:int}/overlay/{number:int}.png", guarded(overlay)),
        Route("/items/{item_id:int}/{action:str}", guarded(act), methods=["POST"]),
        Route("/report", guarded(report)),
        Route("/report/chart.png", guarded(report_chart)),
        Route("/login", login, methods=["GET", "POST"]),
    ])


class ReviewWebServer:
    """uvicorn serving :func:`build_app` in a daemon thread (the daemon's signal handling stays its own)."""

    def __init__(self, store: ReviewStore, review: ReviewConfig) -> None:
        import uvicorn

        check_web_access(review.web)
        self.host = review.web.host
        self._server = uvicorn.Server(uvicorn.Config(
            build_app(store, review, review_token(review.web)), host=review.web.host, port=review.web.port,
            log_config=None, access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None
        self.port = review.web.port

    def start(self) -> None:
        """Start serving; returns once the socket listens.

        Raises:
            SentinelError: The page cannot listen on its host and port.
        """
        self._thread = threading.Thread(target=self._serve, name="sentinel-review-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise SentinelError(f"cannot serve the review page on {self.host}:{self.port}")
            time.sleep(0.02)
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("review page serving", url=f"http://{self.host}:{self.port}/")

    def _serve(self) -> None:
        try:
            self._server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; start() reports it
            log.error("review page stopped", host=self.host, port=self.port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
