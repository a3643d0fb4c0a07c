"""/docs, the readable API page: rendered from the same document as /openapi.json, offline.

Over HTTP against the shared gateway (``gateway_url``): every operation and schema of
/openapi.json has its section, every asset the page names is served by the gateway itself,
and the Content-Security-Policy allows nothing else. In headless Chromium: the page shows the
operations, its stylesheet applies under that policy, and nothing but the gateway is asked.
"""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from selenium.webdriver.common.by import By

from audiomesh.gateway.docs import render_docs
from tests.helpers import browser as browser_helpers

browser = browser_helpers.browser
METHODS = ("get", "post", "put", "patch", "delete")
# Attributes through which a page makes the browser fetch something.
FETCHING = {("link", "href"), ("script", "src"), ("img", "src"), ("iframe", "src"), ("source", "src"), ("audio", "src"),
            ("video", "src"), ("object", "data"), ("embed", "src")}  # fmt: skip
CONTENT_TYPES = {".css": "text/css", ".svg": "image/svg+xml"}


class PageParts(HTMLParser):
    """Tags, element ids, fetched URLs and link targets of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.fetched: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if value is None:
                continue
            if name == "id":
                self.ids.add(value)
            elif (tag, name) in FETCHING:
                self.fetched.append(value)
            elif tag == "a" and name == "href":
                self.links.append(value)
            elif name in ("style", "srcset") or name.startswith("on"):
                raise AssertionError(f"<{tag} {name}=…>: inline styles, srcsets and handlers are not allowed")


def parse(html: str) -> PageParts:
    parts = PageParts()
    parts.feed(html)
    return parts


@pytest.fixture(scope="module")
def docs(gateway_url: str) -> tuple[httpx.Response, PageParts, dict]:
    with httpx.Client(base_url=gateway_url, timeout=30) as http:
        page = http.get("/docs")
        document = http.get("/openapi.json").json()
    assert page.status_code == 200, page.text
    return page, parse(page.text), document


def test_docs_is_html_whose_assets_are_all_served_by_the_gateway(docs, gateway_url):
    page, parts, _ = docs
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "style-src 'self'" in policy and "script-src" not in policy
    assert "http" not in policy and "*" not in policy  # no other origin is allowed
    assert "script" not in parts.tags  # a page rendered on the server: nothing to run
    assert parts.fetched, "the page names no stylesheet"
    base = f"{gateway_url}/docs"
    origin = urlsplit(gateway_url).netloc
    with httpx.Client(timeout=30) as http:
        for ref in parts.fetched:
            url = urljoin(base, ref)
            assert urlsplit(url).netloc == origin, f"{ref} is fetched from another origin"
            asset = http.get(url)
            assert asset.status_code == 200, f"{url}: {asset.status_code}"
            suffix = "." + url.rsplit(".", 1)[-1]
            assert asset.headers["content-type"].startswith(CONTENT_TYPES[suffix]), (url, asset.headers)
            assert asset.content
        for ref in parts.links:  # openapi.json, the web page, and in-page anchors
            if ref.startswith("#"):
                assert ref[1:] in parts.ids, f"link to #{ref[1:]}, which the page does not have"
            else:
                url = urljoin(base, ref)
                assert urlsplit(url).netloc == origin, ref
                assert http.get(url).status_code == 200, url


def test_docs_has_a_section_for_every_operation_and_schema_of_openapi_json(docs):
    _, parts, document = docs
    operations = [op for item in document["paths"].values() for method, op in item.items() if method in METHODS]
    assert {"CreateJob", "UploadFile", "WatchJob", "DownloadTrack"} <= {op["operationId"] for op in operations}
    missing = [op["operationId"] for op in operations if f"op-{op['operationId']}" not in parts.ids]
    assert not missing, f"operations of /openapi.json without a section in /docs: {missing}"
    schemas = document["components"]["schemas"]
    missing = [name for name in schemas if f"schema-{name}" not in parts.ids]
    assert not missing, f"schemas of /openapi.json without a section in /docs: {missing}"


def test_docs_renders_in_chromium_from_the_gateway_alone(browser, gateway_url, docs):
    _, _, document = docs
    browser.get(f"{gateway_url}/docs")
    create = browser.find_element(By.ID, "op-CreateJob")
    assert create.is_displayed()
    assert "POST" in create.text and "/v1/jobs" in create.text and "CreateJobRequest" in create.text
    upload = browser.find_element(By.ID, "op-UploadFile")
    assert "/v1/jobs:upload" in upload.text and "multipart/form-data" in upload.text
    assert "UploadAudioResponse" in upload.text
    headings = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".operation h4")]
    expected = sum(1 for item in document["paths"].values() for method in item if method in METHODS)
    assert len(headings) == expected
    # The stylesheet applied under the page's CSP (cards are bordered, rounded): it loaded.
    radius = browser.execute_script("return getComputedStyle(document.querySelector('.operation')).borderTopLeftRadius")
    assert radius == "10px"
    # Following a $ref goes to its schema.
    create.find_element(By.LINK_TEXT, "CreateJobRequest").click()
    assert browser.execute_script("return location.hash") == "#schema-audiomesh.v1.CreateJobRequest"
    # Everything the page loaded came from the gateway; a load the CSP refused or that failed
    # would be a console error.
    origin = urlsplit(gateway_url).netloc
    loaded = browser.execute_script(
        "return performance.getEntries().filter(e => e.name.includes('://')).map(e => e.name)"
    )
    assert any(url.endswith("/docs.css") for url in loaded), loaded
    assert all(urlsplit(url).netloc == origin for url in loaded), loaded
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_render_escapes_text_and_reads_openapi_3_1_types():
    document = {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1", "description": "<script>alert(1)</script>"},
        "paths": {
            "/things/{id}": {
                "get": {
                    "operationId": "GetThing",
                    "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/x.Thing"}}},
                        }
                    },
                }
            }
        },
        "components": {
            "schemas": {
                "x.Thing": {
                    "type": "object",
                    "properties": {
                        "note": {"type": ["string", "null"], "maxLength": 8},
                        "size": {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
                        "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
                    },
                    "required": ["size"],
                }
            }
        },
    }
    html = render_docs(document)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    parts = parse(html)
    assert {"op-GetThing", "schema-x.Thing"} <= parts.ids
    assert '<a href="#schema-x.Thing"' in html
    assert "string or null" in html and "at most 8 characters" in html
    assert "32-bit" in html and "2147483647" not in html
    assert 'array of one of <span class="enum"><code>&quot;a&quot;</code>' in html


def test_render_escapes_every_string_of_the_document():
    """Every name and value the page prints (keys included: status codes, media types, schema
    and field names) comes out as text: a hostile string makes no tag and no attribute."""
    evil = "\"'><i onmouseover=x>"
    schema_ref = {"$ref": f"#/components/schemas/{evil}"}
    field = {"type": ["string", evil], "format": evil, "pattern": evil, "default": evil, "description": evil,
             "minimum": evil, "maxLength": evil}  # fmt: skip
    document = {
        "openapi": evil,
        "info": {"title": evil, "version": evil, "description": evil},
        "paths": {
            f"/{evil}": {
                "post": {
                    "operationId": evil,
                    "tags": [evil],
                    "summary": evil,
                    "description": evil,
                    "parameters": [{"name": evil, "in": evil, "description": evil, "schema": field}],
                    "requestBody": {"content": {evil: {"schema": schema_ref}}},
                    "responses": {evil: {"description": evil, "content": {evil: {"schema": schema_ref}}}},
                }
            }
        },
        "components": {
            "schemas": {
                evil: {
                    "type": "object",
                    "description": evil,
                    "properties": {
                        evil: field,
                        "m": {"type": "object", "additionalProperties": schema_ref},
                        "e": {"enum": [evil]},
                        "c": {"const": evil},
                        "u": {"anyOf": [{"type": evil}, schema_ref]},
                    },
                    "required": [evil],
                },
            }
        },
    }
    html = render_docs(document)
    parts = parse(html)  # raises on any on* attribute
    assert "i" not in parts.tags
    assert "&lt;i onmouseover=x&gt;" in html


def test_the_web_page_links_the_api_docs_relatively(gateway_url):
    """Relative, so it works behind a path prefix; and it leads to this page."""
    import re

    import httpx

    page = httpx.get(f"{gateway_url}/", timeout=30).text
    (href,) = re.findall(r'<a class="api-docs-link" href="([^"]+)"', page)
    assert not href.startswith(("/", "http")), href
    assert httpx.get(f"{gateway_url}/{href}", timeout=30).status_code == 200
