"""The playground page and the offline API docs.

The browser test drives a real headless Chromium (Debian's `chromium`, through Playwright)
against a live loopback server on the tiny model: it registers centroid examples through the
page's admin form, streams a routed and a manually mixed completion, and checks every coloured
token and every column of the mixture strip against the routing trace of the same request sent
again without streaming. Every request the browser makes to anything but the server is refused
and fails the test, so the page and /docs are shown to work offline.

`SWITCHBOARD_UPDATE_SCREENSHOT=1` also writes the screenshot to docs/playground.png (the README
shows it); by default it goes to the test's temporary folder, so a test run leaves the tree clean.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.conftest import ADMIN
from tests.live import live_server
from tests.paths import REPO, pyproject
from tests.tiny import app_settings

STATIC = REPO / "server" / "api" / "static"
DOCS_SCREENSHOT = REPO / "docs" / "playground.png"
CHROMIUM = os.environ.get("SWITCHBOARD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

CODE_EXAMPLES = ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i)",
                 "import os\nos.path.join(root, name)", "class Point:\n    def __init__(self, x, y):"]
PROSE_EXAMPLES = ["It was a bright cold day in April, and the clocks were striking thirteen.",
                  "The old man walked slowly along the river, thinking of the summer.",
                  "She opened the letter and read it twice before she understood.",
                  "Call me Ishmael. Some years ago, never mind how long precisely."]
PROMPT = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):"
PROSE_PROMPT = "The old man walked slowly along the river, thinking of the summer."


# -- without a browser ----------------------------------------------------------------------------
class _Refs(HTMLParser):
    """Every src/href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def _refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.refs


def test_pages_and_assets_are_served_from_the_package(app_client):
    """Every page, and everything a page links or loads, is served by the server itself."""
    pages = {"/": app_client.get("/"), "/playground": app_client.get("/playground"),
             "/docs": app_client.get("/docs"), "/redoc": app_client.get("/redoc")}
    for path, r in pages.items():
        assert r.status_code == 200 and "text/html" in r.headers["content-type"], path
    assert "playground" in _refs(pages["/"].text)
    assert {"static/playground.js", "static/playground.css"} <= set(_refs(pages["/playground"].text))
    assert "SwaggerUIBundle" in pages["/docs"].text and "redoc.standalone.js" in pages["/redoc"].text
    for path, r in pages.items():
        refs = _refs(r.text) + re.findall(r"""(?:url)\s*:\s*['"]([^'"]+)['"]""", r.text)
        assert refs, path
        for ref in refs:
            url = urlsplit(urljoin(f"http://testserver{path}", ref))
            assert url.netloc == "testserver", f"{path} refers to {ref!r}, outside the server"
            assert app_client.get(url.path).status_code == 200, f"{path}: {ref} -> {url.path}"
        assert "https://" not in r.text and "http://" not in r.text, path
    for asset in ("/static/playground.js", "/static/playground.css", "/static-docs/swagger-ui-bundle.js",
                  "/static-docs/swagger-ui.css", "/static-docs/redoc.standalone.js"):
        assert len(app_client.get(asset).content) > 1000, asset
    for f in STATIC.iterdir():  # no absolute URL anywhere in the playground's own files (an XML namespace is a name)
        assert "://" not in f.read_text().replace('xmlns="http://www.w3.org/2000/svg"', ""), f.name
    # the pages are not API operations
    # (`POST /` is LoRAX's generate entry point, an API operation; the landing page's GET is not)
    paths = app_client.get("/openapi.json").json()["paths"]
    assert not [p for p in ("/", "/playground", "/docs") if "get" in paths.get(p, {})]


def test_pages_are_package_data():
    """A non-editable install must ship server/api/static: pyproject declares it as package data."""
    project = pyproject()
    patterns = project["tool"]["setuptools"]["package-data"]["server.api"]
    shipped = {p.relative_to(STATIC.parent).as_posix() for pattern in patterns for p in STATIC.parent.glob(pattern)}
    assert {f"static/{f.name}" for f in STATIC.iterdir()} <= shipped


# -- in Chromium ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: install Debian's browser with "
                    "`apt-get install -y chromium` (CI's .ci/run does), or set SWITCHBOARD_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


class Offline:
    """Lets the page reach only `base`; anything else is aborted and recorded (and fails the test)."""

    def __init__(self, page, base: str, allowed_status: int = 400) -> None:
        self.base, self.refused, self.errors = base, [], []
        self.allowed = f"status of {allowed_status}"
        page.route("**/*", self._route)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", self._console)

    def _console(self, message) -> None:
        # the browser logs every 4xx response; each test provokes one kind (a 400, or a 401), which the page must show
        if message.type == "error" and self.allowed not in message.text:
            self.errors.append(message.text)

    def _route(self, route) -> None:
        if route.request.url.startswith(self.base + "/"):
            route.continue_()
        else:
            self.refused.append(route.request.url)
            route.abort()


def _tokens(page) -> list[dict]:
    return page.eval_on_selector_all("#output .tok", """nodes => nodes.map(n => ({
        index: Number(n.dataset.index), top: n.dataset.top, weights: JSON.parse(n.dataset.weights),
        text: n.dataset.text, segment: Number(n.dataset.segment), colour: getComputedStyle(n).borderBottomColor,
        segStart: n.classList.contains('seg-start')}))""")


def _columns(page) -> list[dict]:
    return page.eval_on_selector_all("#strip .col", """nodes => nodes.map(n => ({
        index: Number(n.dataset.index), weights: JSON.parse(n.dataset.weights), reroute: n.classList.contains('reroute'),
        height: n.getBoundingClientRect().height,
        parts: [...n.querySelectorAll('.part')].map(p => ({adapter: p.dataset.adapter, height: p.getBoundingClientRect().height,
                                                            colour: getComputedStyle(p).backgroundColor}))}))""")


def _legend(page) -> dict[str, str]:
    pairs = page.eval_on_selector_all("#legend .legend-item", """nodes => nodes.map(n => [n.textContent.trim(),
        getComputedStyle(n.querySelector('.chip')).backgroundColor])""")
    return dict(pairs)


def _top(weights: dict[str, float]) -> str:
    positive = {k: v for k, v in weights.items() if v > 0}
    return max(sorted(positive), key=positive.__getitem__) if positive else "base"


def _generate(page) -> None:
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]", timeout=60_000)
    assert page.is_hidden("#run-error"), page.inner_text("#run-error")


def _check_against_trace(page, body: dict, base: str) -> tuple[list[dict], list[dict]]:
    """The page's tokens and strip against the same request sent again without streaming."""
    reference = httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=60).json()
    choice = reference["choices"][0]
    segments = json.loads(page.get_attribute("#trace", "data-segments"))
    assert segments == choice["routing"], "the page's trace is not the response's routing trace"
    tokens, columns, legend = _tokens(page), _columns(page), _legend(page)
    n = segments[-1]["end_token"]
    assert n == reference["usage"]["completion_tokens"] == len(tokens) == len(columns)
    assert "".join(t["text"] for t in tokens) == choice["text"]
    assert [t["index"] for t in tokens] == [c["index"] for c in columns] == list(range(n))
    starts = {s["start_token"] for s in segments}
    marks = page.eval_on_selector_all("#strip-marks .mark.reroute", "ns => ns.map(n => Number(n.dataset.index))")
    assert set(marks) == starts
    for k, seg in enumerate(segments):
        for i in range(seg["start_token"], seg["end_token"]):
            tok, col = tokens[i], columns[i]
            assert tok["segment"] == k and tok["segStart"] == (i in starts) and col["reroute"] == (i in starts)
            # tokens carry the weights in force (rounded like the trace); a segment keeps its top
            # adapter and stays within the trace's tolerance of its first step
            assert tok["top"] == _top(seg["weights"]) == _top(tok["weights"])
            assert tok["weights"].keys() <= seg["weights"].keys() | {k for k, v in tok["weights"].items() if v <= 0.02}
            assert all(abs(tok["weights"].get(a, 0) - seg["weights"].get(a, 0)) <= 0.02 + 1e-6
                       for a in tok["weights"].keys() | seg["weights"].keys())
            if i == seg["start_token"]:
                assert tok["weights"] == seg["weights"]
            assert tok["colour"] == legend[tok["top"]], f"token {i} is not coloured by its top adapter"
            # the strip column stacks the same weights, each in its adapter's colour
            assert col["weights"] == tok["weights"]
            total = sum(w for w in tok["weights"].values() if w > 0)
            parts = {p["adapter"]: p for p in col["parts"]}
            assert set(parts) == {a for a, w in tok["weights"].items() if w > 0}
            for a, p in parts.items():
                assert p["height"] == pytest.approx(col["height"] * tok["weights"][a] / total, abs=1.0)
                assert p["colour"] == legend[a]
    return tokens, segments


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_playground_in_chromium(browser, store, tiny_model_dir, tmp_path):
    settings = app_settings(tiny_model_dir, store)
    with live_server(settings) as (base, _app):
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        offline = Offline(page, base)
        page.goto(f"{base}/")
        page.click("#link-playground")
        page.wait_for_selector("body[data-ready='1']")
        assert page.url == f"{base}/playground"

        # without a token: adapters from /v1/models, admin actions off
        assert page.eval_on_selector_all("#adapters li", "ns => ns.map(n => n.dataset.adapter)") == ["alpha", "beta"]
        assert page.is_disabled("#register")
        options = page.eval_on_selector_all("#model option", "ns => ns.map(n => n.value)")
        assert options[:3] == ["auto", "alpha", "beta"] and len(options) == 4
        # the manual mixture is off: its sliders show no weight (none is sent)
        assert page.eval_on_selector_all("#sliders output", "ns => ns.map(n => n.textContent)") == ["—", "—"]
        # colours follow names, not positions: another adapter listed before them recolours nothing
        before = page.evaluate("['alpha', 'beta'].map(colourOf)")
        page.evaluate("state.colours.clear(); ['aaa', 'alpha', 'beta'].forEach(colourOf)")
        assert page.evaluate("['alpha', 'beta'].map(colourOf)") == before

        # admin: the token, then register (replace) both adapters with centroid examples
        page.fill("#admin-token", "T")
        page.wait_for_selector("body.admin-on")
        for name, examples in (("alpha", CODE_EXAMPLES), ("beta", PROSE_EXAMPLES)):
            page.fill("#reg-name", name)
            page.fill("#reg-path", name)
            page.fill("#reg-k", "1")  # one mean centroid: the routing asserted below was recorded with it
            page.fill("#reg-examples", "\n".join(e.replace("\n", " ") for e in examples))
            page.click("#register")
            page.wait_for_function(f"document.getElementById('admin-log').textContent.includes('({name})')")
            assert page.get_attribute("#admin-log", "data-status") == "ok", page.inner_text("#admin-log")
            assert '"status": "replaced"' in page.inner_text("#admin-log")
        listed = httpx.get(f"{base}/admin/adapters", headers=ADMIN).json()["adapters"]
        assert [(a["name"], a["centroids"]) for a in listed] == [("alpha", [1, 64]), ("beta", [1, 64])]
        page.wait_for_function("document.querySelectorAll('#routers li')[0]?.textContent.includes('alpha, beta')")

        # a manual mixture: first an all-zero one, which the server refuses and the page reports
        page.select_option("#model", "auto")
        page.fill("#prompt", PROMPT)
        page.fill("#max-tokens", "12")
        page.check("#manual-mix")
        for name in ("alpha", "beta"):
            page.eval_on_selector(f"#mix-{name}", "s => { s.value = '0'; s.dispatchEvent(new Event('input')); }")
        page.click("#generate")
        page.wait_for_selector("#output[data-state=done]")
        assert "routing.weights is empty" in page.inner_text("#run-error")
        # then 3:1: every token carries it, the strip is flat
        for name, value in (("alpha", "0.75"), ("beta", "0.25")):
            page.eval_on_selector(f"#mix-{name}", f"s => {{ s.value = '{value}'; s.dispatchEvent(new Event('input')); }}")
        _generate(page)
        body = {"model": "auto", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                "routing": {"weights": {"alpha": 0.75, "beta": 0.25}}}
        tokens, segments = _check_against_trace(page, body, base)
        assert len(segments) == 1 and {t["top"] for t in tokens} == {"alpha"}

        # routed by the centroids, re-routed every 3 tokens
        page.fill("#prompt", PROSE_PROMPT)
        page.uncheck("#manual-mix")
        page.select_option("#router", "centroid")
        page.fill("#reroute-every", "3")
        page.fill("#route-temperature", "0.2")
        page.fill("#max-tokens", "40")
        _generate(page)
        body = {"model": "auto", "prompt": PROSE_PROMPT, "max_tokens": 40, "temperature": 0,
                "routing": {"router": "centroid", "reroute_every": 3, "temperature": 0.2}}
        tokens, segments = _check_against_trace(page, body, base)
        assert len(segments) >= 2, f"expected the mixture to change while streaming, got {segments}"
        assert {t["top"] for t in tokens} <= {"alpha", "beta"}
        hover = page.get_attribute("#output .tok[data-index='0']", "title")
        assert all(f"{a} " in hover for a in tokens[0]["weights"])

        # live counters agree with /metrics once the page has polled again
        scrape = httpx.get(f"{base}/metrics").text
        requests = _metric(scrape, "switchboard_requests_total")
        assert requests == 5  # three streamed by the page (one refused), two sent by this test
        page.wait_for_function(f"document.getElementById('m-requests').dataset.value === '{requests:g}'", timeout=10_000)
        assert page.inner_text("#m-errors") == "1"
        decisions = page.eval_on_selector_all("#m-decisions .bar-row", "ns => ns.map(n => [n.dataset.adapter, Number(n.dataset.value)])")
        assert dict(decisions) == {a: _metric(scrape, "switchboard_route_decisions_total", adapter=a) for a, _ in decisions}
        assert {a for a, _ in decisions} >= {"alpha"}

        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("SWITCHBOARD_UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, DOCS_SCREENSHOT)

        # admin: unload beta from its row
        page.click("#adapters button[data-unload='beta']")
        page.wait_for_function("!document.querySelector(\"#adapters li[data-adapter='beta']\")")
        assert '"status": "unloaded"' in page.inner_text("#admin-log")
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]][1:] == ["auto", "alpha"]

        # admin: reload the store, which registers beta's folder again (with the centroid saved beside it)
        page.click("#reload")
        page.wait_for_function("document.getElementById('admin-log').textContent.includes('POST /admin/reload')")
        assert page.get_attribute("#admin-log", "data-status") == "ok", page.inner_text("#admin-log")
        assert json.loads(page.inner_text("#admin-log").split("\n", 1)[1])["loaded"] == ["beta"]
        page.wait_for_selector("#adapters li[data-adapter='beta']")
        listed = httpx.get(f"{base}/admin/adapters", headers=ADMIN).json()["adapters"]
        assert [(a["name"], a["centroids"]) for a in listed] == [("alpha", [1, 64]), ("beta", [1, 64])]

        # /docs renders from local assets
        page.goto(f"{base}/docs")
        page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
        assert "Switchboard" in page.inner_text(".swagger-ui .info .title")
        page.wait_for_selector(".opblock-summary-path[data-path='/v1/completions']")
        assert offline.refused == [], f"the pages tried to reach the network: {offline.refused}"
        assert offline.errors == [], offline.errors


@pytest.mark.slow
def test_playground_sends_the_api_key(browser, store, tiny_model_dir):
    """With `--api-key` the page says the key is needed, then lists the models and streams a
    completion once the user enters it (sent on /v1/* only, as the server checks it)."""
    settings = app_settings(tiny_model_dir, store, server={"api_key": "K"})
    with live_server(settings) as (base, _app):
        page = browser.new_page()
        offline = Offline(page, base, allowed_status=401)
        page.goto(f"{base}/playground")
        page.wait_for_function("document.getElementById('server-status').textContent === 'API key needed'")
        assert page.eval_on_selector_all("#model option", "ns => ns.length") == 0
        page.fill("#api-key", "K")
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_function("document.getElementById('server-status').textContent === 'ready'")
        page.select_option("#model", "alpha")
        page.fill("#max-tokens", "4")
        _generate(page)
        assert len(_tokens(page)) == 4
        assert offline.refused == [] and offline.errors == [], (offline.refused, offline.errors)
