"""The demo page is served with its assets, stays framework-free, and is reachable cross-origin."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from service.redis.connections import RedisOpener
from service.settings import Settings

from app_clients import AppClient, MakeSettings, StartClient

# The repository's web/, which the wheel ships as package data.
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
Attrs = list[tuple[str, str | None]]


class PageOutline(HTMLParser):
    """The parts of index.html the checks below look at."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: Attrs) -> None:
        self.tags.append((tag, {name: value or "" for name, value in attrs}))

    def find(self, tag: str, **wanted: str) -> list[dict[str, str]]:
        return [
            attrs
            for name, attrs in self.tags
            if name == tag and all(attrs.get(key) == value for key, value in wanted.items())
        ]


def outline() -> PageOutline:
    parser = PageOutline()
    parser.feed((WEB_DIR / "index.html").read_text(encoding="utf-8"))
    return parser


def asset_urls(page: PageOutline) -> list[str]:
    return [a["src"] for a in page.find("script") if "src" in a] + [
        a["href"] for a in page.find("link", rel="stylesheet")
    ]


@pytest.fixture
async def client(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    settings: Settings = make_settings(demo_runs=False)
    return await start_client(settings, fake_opener)


async def test_page_is_served_at_the_root(client: AppClient) -> None:
    response = await client.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert await response.text() == (WEB_DIR / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("url", "content_type"),
    [("/app.js", "text/javascript"), ("/style.css", "text/css")],
)
async def test_assets_are_served_next_to_the_page(
    client: AppClient, url: str, content_type: str
) -> None:
    response = await client.get(url)
    assert response.status == 200
    assert response.headers["Content-Type"] == f"{content_type}; charset=utf-8"
    assert await response.read() == (WEB_DIR / url.lstrip("/")).read_bytes()


async def test_every_asset_the_page_names_is_served(client: AppClient) -> None:
    urls = asset_urls(outline())
    assert sorted(urls) == ["app.js", "style.css"]
    for url in urls:
        response = await client.get(f"/{url}")
        assert response.status == 200, url


async def test_only_the_page_files_are_served(client: AppClient) -> None:
    for url in ("/index.js", "/web/app.js", "/..%2Fpyproject.toml", "/%2e%2e/pyproject.toml"):
        response = await client.get(url)
        assert response.status == 404, url


def test_assets_are_relative_and_local() -> None:
    """No CDN, no absolute host: the page works behind any prefix and from a plain file."""
    for url in asset_urls(outline()):
        assert not re.match(r"^([a-z]+:)?//|^/", url), url
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=\"(https?:)?//", html)
    assert "integrity=" not in html


@pytest.mark.parametrize(
    "pattern",
    [
        r"\binnerHTML\b",
        r"\bouterHTML\b",
        r"\binsertAdjacentHTML\b",
        r"\bdocument\.write\b",
        r"\beval\(",
        r"\bimport\b",
        r"https?://\w",
    ],
)
def test_script_builds_the_page_with_text_only(pattern: str) -> None:
    script = (WEB_DIR / "app.js").read_text(encoding="utf-8")
    assert not re.search(pattern, script), pattern


def test_api_urls_in_the_script_are_relative() -> None:
    script = (WEB_DIR / "app.js").read_text(encoding="utf-8")
    assert '"sse/getSessionId"' in script
    assert '"sse/connect?sessionId="' in script
    assert '"/sse/' not in script


def test_page_is_made_for_phones_and_assistive_technology() -> None:
    page = outline()
    assert page.find("html", lang="en")
    assert page.find("meta", name="viewport", content="width=device-width, initial-scale=1")
    assert page.find("main")
    assert page.find("h1")
    labelled = {attrs["for"] for attrs in page.find("label")}
    for control in page.find("input") + page.find("select") + page.find("textarea"):
        assert control.get("id") in labelled, control
    assert page.find("span", id="status", role="status")
    assert page.find("ol", id="events", **{"aria-live": "polite"})
    assert page.find("button", id="start", type="submit")
    assert page.find("a", id="second-viewer", rel="noopener")


def test_web_directory_holds_only_the_page() -> None:
    assert sorted(path.name for path in Path(WEB_DIR).iterdir()) == [
        "app.js",
        "index.html",
        "style.css",
    ]


async def test_cross_origin_page_can_get_a_session(client: AppClient) -> None:
    response = await client.get("/sse/getSessionId", headers={"Origin": "http://page.example:8000"})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "http://page.example:8000")


async def test_cross_origin_resume_passes_the_preflight(client: AppClient) -> None:
    """A reconnect from another origin carries `Last-Event-ID`, which needs a CORS preflight."""
    response = await client.options(
        "/sse/connect?sessionId=abc",
        headers={
            "Origin": "http://page.example:8000",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "http://page.example:8000")
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "last-event-id" in allowed or allowed == "*"
    assert "GET" in response.headers["Access-Control-Allow-Methods"]
