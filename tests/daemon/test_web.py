"""The review page's access rule and actions over real HTTP (uvicorn on a free loopback port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pacs_sentinel.daemon.config import parse_config
from pacs_sentinel.daemon.jobs import MIGRATIONS, JobStore
from pacs_sentinel.daemon.review import ReviewStatus, ReviewStore
from pacs_sentinel.daemon.web import COOKIE_NAME, TOKEN_ENV, ReviewWebServer, check_web_access, is_loopback
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.errors import ConfigError
from tests.conftest import free_port

TOKEN = "s3cret-token"


def _seed(tmp_path: Path) -> ReviewStore:
    database = Database(tmp_path / "sentinel.db", migrations=MIGRATIONS)
    jobs = JobStore(database)
    out_dir = tmp_path / "results" / "job-1"
    out_dir.mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8), mode="RGB").save(out_dir / "overlay_1.png")
    jobs.queue_study("1.2.3", {"organ-seg": 0.0})
    job = jobs.claim_next()
    assert job is not None
    jobs.record_results(job.id, outbox_items=[], result={
        "series_uid": "1.2.3.4", "model": "organ-seg", "model_version": "1.1.0", "qc_version": "1.2.0",
        "verdict": "Needs review", "quality_score": 0.12, "reasons": ["Fragmentation"], "needs_review": True,
        "output_dir": str(out_dir)})
    return ReviewStore(database)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:  # type: ignore[type-arg]
    """Start a review page over a seeded worklist: served(token=...) -> (base URL, store)."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    servers: list[ReviewWebServer] = []

    def start(token: str = "", **review: object) -> tuple[str, ReviewStore]:
        store = _seed(tmp_path)
        config = parse_config({"review": {**review, "web": {"enabled": True, "port": free_port(), "token": token}}})
        server = ReviewWebServer(store, config.review)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}", store

    yield start
    for server in servers:
        server.stop()


def test_a_non_loopback_page_without_a_token_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    exposed = parse_config({"review": {"web": {"enabled": True, "host": "0.0.0.0"}}})
    with pytest.raises(ConfigError, match=r"review.web.token: the review page is bound to '0.0.0.0'"):
        check_web_access(exposed.review.web)
    with pytest.raises(ConfigError, match="not a loopback address"):
        ReviewWebServer(ReviewStore(None), exposed.review)  # type: ignore[arg-type]
    check_web_access(parse_config({"review": {"web": {"enabled": True, "host": "0.0.0.0", "token": "t"}}}).review.web)
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    check_web_access(exposed.review.web)  # the environment's token counts
    for host, loopback in (("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("localhost", True),
                           ("0.0.0.0", False), ("10.1.2.3", False), ("review.example.org", False)):
        assert is_loopback(host) is loopback, host


def test_check_config_reports_an_exposed_page_without_a_token(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "config.toml"
    config.write_text('[review.web]\nenabled = true\nhost = "0.0.0.0"\n')
    env = {k: v for k, v in __import__("os").environ.items() if k != TOKEN_ENV}
    result = subprocess.run([sys.executable, "-m", "pacs_sentinel", "check-config", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert "review.web.token: the review page is bound to '0.0.0.0'" in result.stderr


def test_with_a_token_every_request_without_it_gets_401(served) -> None:  # type: ignore[no-untyped-def]
    base, store = served(token=TOKEN)
    for method, path in (("GET", "/"), ("GET", "/items/1"), ("GET", "/items/1/overlay/1.png"),
                         ("POST", "/items/1/claim"), ("POST", "/items/1/resolve")):
        response = httpx.request(method, base + path, data={"reviewer": "x", "decision": "ai-correct"})
        assert response.status_code == 401, (method, path)
        wrong = httpx.request(method, base + path, headers={"Authorization": "Bearer nope"},
                              cookies={COOKIE_NAME: "nope"}, data={"reviewer": "x", "decision": "ai-correct"})
        assert wrong.status_code == 401, (method, path)
    assert store.get(1).status is ReviewStatus.OPEN  # the refused POSTs changed nothing

    bearer = httpx.get(base + "/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200 and "#1" in bearer.text
    image = httpx.get(base + "/items/1/overlay/1.png", headers={"Authorization": f"Bearer {TOKEN}"})
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"

    with httpx.Client(base_url=base) as browser:
        assert browser.post("/login", data={"token": "nope"}).status_code == 401
        login = browser.post("/login", data={"token": TOKEN, "next": "/items/1"})
        assert login.status_code == 303 and login.headers["location"] == "/items/1"
        assert browser.get("/items/1").status_code == 200  # the cookie carries the token


def test_loopback_without_a_token_serves_and_the_actions_work(served) -> None:  # type: ignore[no-untyped-def]
    base, store = served(viewer_url="https://viewer.example.org/?s={StudyInstanceUID}")
    with httpx.Client(base_url=base) as client:
        page = client.get("/items/1")
        assert page.status_code == 200
        assert "0.12" in page.text and "Fragmentation: the mask is split into several separate pieces" in page.text
        assert 'href="https://viewer.example.org/?s=1.2.3"' in page.text
        assert 'src="/items/1/overlay/1.png"' in page.text
        assert client.get("/items/1/overlay/2.png").status_code == 404
        assert client.get("/items/9").status_code == 404

        forged = client.post("/items/1/resolve", data={"reviewer": "x", "decision": "ai-correct"},
                             headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403 and store.get(1).status is ReviewStatus.OPEN
        claim = client.post("/items/1/claim", data={"reviewer": "dr-a"}, headers={"Origin": base})
        assert claim.status_code == 303 and claim.headers["location"] == "/items/1"
        conflict = client.post("/items/1/resolve", data={"reviewer": "dr-b", "decision": "ai-correct"})
        assert conflict.status_code == 409 and "claimed by dr-a" in conflict.text
        for form, message in (({"reviewer": "dr-a", "decision": "bogus"}, "is not one of"),
                              ({"reviewer": " ", "decision": "ai-correct"}, "reviewer: a name is required")):
            wrong = client.post("/items/1/resolve", data=form)  # a bad request, not a conflict
            assert wrong.status_code == 400 and message in wrong.text and store.get(1).status is ReviewStatus.CLAIMED
        done = client.post("/items/1/resolve", data={"reviewer": "dr-a", "decision": "ai-rejected", "comments": "x"})
        assert done.status_code == 303 and done.headers["location"] == "/"
        assert "#1" not in client.get("/").text
        assert "#1" in client.get("/?status=resolved").text
        assert client.get("/?status=bogus").status_code == 400
    item = store.get(1)
    assert item.status is ReviewStatus.RESOLVED and item.reviewer == "dr-a" and item.decision.value == "ai-rejected"


def test_sentinel_run_refuses_an_exposed_page_without_a_token(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    config = tmp_path / "config.toml"
    config.write_text(f'[node]\ndata_dir = "var"\nport = {free_port()}\n\n[review.web]\nenabled = true\nhost = "0.0.0.0"\n')
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    result = subprocess.run([sys.executable, "-m", "pacs_sentinel", "run", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "sentinel: review.web.token: the review page is bound to '0.0.0.0'" in result.stderr
