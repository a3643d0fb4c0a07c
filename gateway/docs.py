"""``/docs``: the gateway's OpenAPI document as one readable HTML page, rendered here.

Why not Swagger UI: the one packaged build (PyPI ``swagger-ui-bundle`` 1.1.0, Apache-2.0) is
Swagger UI 4.15.5, which refuses OpenAPI 3.1 ("Supported version fields are … openapi: 3.0.n"),
so it could only show a second, down-converted document; it is also 1 MB of JavaScript that
asks validator.swagger.io about the document unless told not to. Rendering the very dict that
``/openapi.json`` serves needs no script, no CDN and no new dependency: the page's one asset is
``static/docs.css`` from this package, and its Content-Security-Policy allows nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from html import escape

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

__all__ = ["CONTENT_SECURITY_POLICY", "docs_endpoint", "render_docs"]

# Only this origin, only the stylesheet and images: no script, no frames, no form posts.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
_REF_PREFIX = "#/components/schemas/"
# Ranges that only say the protobuf field's width: named instead of printed in ten digits.
_INT_WIDTHS: dict[tuple[object, object], str] = {(-(2**31), 2**31 - 1): "32-bit", (0, 2**32 - 1): "32-bit unsigned"}
_UNTAGGED = "Uploads, downloads and other gateway routes"


def docs_endpoint(document: dict) -> Callable[[Request], Awaitable[Response]]:
    """The ``/docs`` handler: the page is rendered once, from the document ``/openapi.json`` serves."""
    page = render_docs(document)
    headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }

    async def docs(request: Request) -> Response:
        return HTMLResponse(page, headers=headers)

    return docs


def render_docs(document: dict) -> str:
    """``document`` (OpenAPI 3.x as a dict) → a standalone HTML page.

    Every operation (grouped by its first tag, in path order) with its parameters, request
    body and responses, then every schema of ``components.schemas``; ``$ref`` become links.
    """
    info = document.get("info", {})
    title = str(info.get("title", "API"))
    schemas: dict = document.get("components", {}).get("schemas", {})
    groups: dict[str, list[tuple[str, str, dict]]] = {}
    for path, item in document.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                operation = item[method]
                groups.setdefault((operation.get("tags") or [_UNTAGGED])[0], []).append((method, path, operation))
    order = sorted(groups, key=lambda tag: tag == _UNTAGGED)  # tagged (the gRPC API's) groups first

    nav = ['<nav class="toc" aria-label="Contents"><h2>Operations</h2>']
    body = ['<section aria-labelledby="operations"><h2 id="operations">Operations</h2>']
    for tag in order:
        nav.append(f"<h3>{escape(tag)}</h3><ul>")
        body.append(f'<h3 class="group">{escape(tag)}</h3>')
        for method, path, operation in groups[tag]:
            anchor = _op_anchor(method, path, operation)
            nav.append(
                f'<li><a href="#{escape(anchor)}">{_verb(method)} <code>{escape(path)}</code></a>'
                f'<span class="opid">{escape(str(operation.get("operationId", "")))}</span></li>'
            )
            body.append(_operation(method, path, operation, anchor))
        nav.append("</ul>")
    body.append("</section>")
    nav.append(f'<h2><a href="#schemas">Schemas</a></h2><p class="count">{len(schemas)} message types</p></nav>')
    body.append('<section aria-labelledby="schemas"><h2 id="schemas">Schemas</h2>')
    body += [_schema_section(name, schema) for name, schema in sorted(schemas.items())]
    body.append("</section>")

    description = f"<p>{escape(str(info['description']))}</p>" if info.get("description") else ""
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="color-scheme" content="light dark">',
            f"<title>{escape(title)} HTTP API</title>",
            # Relative: the page also works when the gateway sits behind a path prefix.
            '<link rel="stylesheet" href="static/docs.css">',
            '<link rel="icon" href="static/docs-icon.svg" type="image/svg+xml">',  # else a /favicon.ico 404
            "</head>",
            "<body>",
            '<a class="skip-link" href="#main">Skip to content</a>',
            '<header class="site-header">',
            f'<h1>{escape(title)} HTTP API <span class="version">{escape(str(info.get("version", "")))}</span></h1>',
            description,
            f'<p class="links">OpenAPI {escape(str(document.get("openapi", "")))} document: '
            '<a href="openapi.json">openapi.json</a> · <a href="./">the web page</a> · errors are '
            '<a href="#schema-google.rpc.Status"><code>google.rpc.Status</code></a> JSON; with API keys on, send '
            "<code>Authorization: Bearer KEY</code>.</p>",
            "</header>",
            '<div class="layout">',
            *nav,
            '<main id="main" tabindex="-1">',
            *body,
            "</main>",
            "</div>",
            "</body>",
            "</html>",
            "",
        ]
    )


def _op_anchor(method: str, path: str, operation: dict) -> str:
    return "op-" + str(operation.get("operationId") or f"{method}-{path}")


def _verb(method: str) -> str:
    return f'<span class="verb verb-{method}">{method.upper()}</span>'


def _operation(method: str, path: str, operation: dict, anchor: str) -> str:
    parts = [
        f'<section class="operation" id="{escape(anchor)}" aria-labelledby="{escape(anchor)}-h">',
        f'<h4 id="{escape(anchor)}-h">{_verb(method)} <code class="path">{escape(path)}</code>'
        f' <span class="opid">{escape(str(operation.get("operationId", "")))}</span></h4>',
    ]
    for key in ("summary", "description"):
        if operation.get(key):
            parts.append(f"<p>{escape(str(operation[key]))}</p>")
    parameters = operation.get("parameters") or []
    if parameters:
        rows = [
            (
                f"<code>{escape(str(p.get('name', '')))}</code>",
                escape(str(p.get("in", ""))),
                _type(p.get("schema", {})),
                _notes(p.get("schema", {}), required=bool(p.get("required")), description=p.get("description")),
            )
            for p in parameters
        ]
        parts.append(_table("Parameters", ("Name", "In", "Type", "Notes"), rows))
    request_body = operation.get("requestBody")
    if request_body:
        need = "required" if request_body.get("required") else "optional"
        parts.append(f'<p class="label">Request body ({need})</p>')
        for media, content in request_body.get("content", {}).items():
            parts.append(f'<p class="media"><code>{escape(media)}</code></p>')
            parts.append(_schema_block(content.get("schema", {})))
    responses = operation.get("responses") or {}
    if responses:
        response_rows: list[tuple[str, ...]] = []
        for codes, response in _same_responses(responses):
            content = response.get("content") or {}
            shapes = "<br>".join(
                f"<code>{escape(media)}</code>: {_type(c.get('schema', {}))}" for media, c in content.items()
            )
            response_rows.append((escape(" ".join(codes)), escape(str(response.get("description", ""))), shapes or "—"))
        parts.append(_table("Responses", ("Status", "Meaning", "Body"), response_rows))
    parts.append("</section>")
    return "\n".join(parts)


def _same_responses(responses: dict) -> list[tuple[list[str], dict]]:
    """Status codes that share one response object (the thirteen error statuses) as one row."""
    grouped: dict[str, tuple[list[str], dict]] = {}
    for code, response in responses.items():
        key = json.dumps(response, sort_keys=True)
        grouped.setdefault(key, ([], response))[0].append(str(code))
    return list(grouped.values())


def _schema_section(name: str, schema: dict) -> str:
    return (
        f'<section class="schema" id="schema-{escape(name)}" aria-labelledby="schema-{escape(name)}-h">'
        f'<h3 id="schema-{escape(name)}-h"><code>{escape(name)}</code></h3>\n{_schema_block(schema)}</section>'
    )


def _schema_block(schema: dict) -> str:
    """An object with properties as a field table; anything else as one line of type and notes."""
    properties = schema.get("properties")
    if not properties:
        notes = _notes(schema)
        return f'<p class="shape">{_type(schema)}{" — " + notes if notes else ""}</p>'
    required = set(schema.get("required", []))
    rows = [
        (f"<code>{escape(name)}</code>", _type(sub), _notes(sub, required=name in required))
        for name, sub in properties.items()
    ]
    head = f"<p>{escape(str(schema['description']))}</p>" if schema.get("description") else ""
    return head + _table("", ("Field", "Type", "Notes"), rows)


def _table(caption: str, headers: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    """Cells are HTML already escaped by the caller."""
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    # data-label: on a phone each row stacks into labelled lines (docs.css).
    body = "".join(
        "<tr>"
        + "".join(f'<td data-label="{escape(h)}">{cell}</td>' for h, cell in zip(headers, row, strict=True))
        + "</tr>"
        for row in rows
    )
    return f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _type(schema: dict) -> str:
    """A schema's shape in a few words of HTML: ``$ref`` as a link, arrays, maps, enums, unions."""
    if "$ref" in schema:
        name = str(schema["$ref"]).removeprefix(_REF_PREFIX)
        short = name.rsplit(".", 1)[-1]
        return f'<a href="#schema-{escape(name)}" title="{escape(name)}"><code>{escape(short)}</code></a>'
    if "const" in schema:
        return f"<code>{escape(json.dumps(schema['const']))}</code>"
    if "enum" in schema:
        values = ", ".join(f"<code>{escape(json.dumps(v))}</code>" for v in schema["enum"])
        return f'one of <span class="enum">{values}</span>'
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    words = [_kind(kind, schema) for kind in kinds]
    for alternative in schema.get("anyOf", []) + schema.get("oneOf", []):
        if words and not {"type", "$ref", "enum"} & alternative.keys():
            continue  # a refinement of the type (a const, a range): the notes say it
        word = _type(alternative)
        if word and word not in words:
            words.append(word)
    return " or ".join(words) if words else "any"


def _kind(kind: str, schema: dict) -> str:
    if kind == "array":
        return "array of " + _type(schema.get("items", {}))
    if kind == "object":
        properties = schema.get("properties")
        if properties:
            fields = ", ".join(f"<code>{escape(n)}</code>: {_type(s)}" for n, s in properties.items())
            return f"object {{{fields}}}"
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return "map of string to " + _type(extra)
        return "object"
    word = escape(kind)
    if schema.get("format"):
        word += f" ({escape(str(schema['format']))})"
    return word


def _notes(schema: dict, *, required: bool = False, description: object = None) -> str:
    """Description, then limits (ranges, lengths, pattern, default), then 'required'."""
    notes = [escape(str(text)) for text in (description, schema.get("description")) if text]
    bounds = (schema.get("minimum"), schema.get("maximum"))
    width = _INT_WIDTHS.get(bounds) if schema.get("type") == "integer" else None
    limits = [width] if width else []
    limits += [
        f"{symbol} {escape(json.dumps(schema[key]))}"
        for key, symbol in (
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("exclusiveMaximum", "<"),
        )
        if key in schema and not (width and key in ("minimum", "maximum"))
    ]
    for key, words in (
        ("minLength", "at least {} characters"),
        ("maxLength", "at most {} characters"),
        ("minItems", "at least {} items"),
        ("maxItems", "at most {} items"),
    ):
        if key in schema:
            limits.append(words.format(escape(str(schema[key]))))
    if "pattern" in schema:
        limits.append(f"matches <code>{escape(str(schema['pattern']))}</code>")
    if "default" in schema:
        limits.append(f"default <code>{escape(json.dumps(schema['default']))}</code>")
    if limits:
        notes.append(f'<span class="limits">{", ".join(limits)}</span>')
    if required:
        notes.append('<span class="required">required</span>')
    return "<br>".join(notes)
