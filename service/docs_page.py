"""The /docs page: the OpenAPI document rendered as one self-contained HTML page.

It is rendered on the server from the same document /openapi.json serves, with every value
escaped, and needs no script, CDN or network access: operators can read it anywhere.
"""

from __future__ import annotations

import functools
import json
import re
from html import escape
from typing import Any

from aiohttp import web

from .openapi import Spec, build_document
from .resources import settings_key
from .settings import Settings

_METHODS = ("get", "post", "put", "patch", "delete")

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 1rem; }
h1 { margin-bottom: 0; } h2 { border-bottom: 1px solid #ccc; margin-top: 2.5rem; }
section.op { border: 1px solid #ddd; border-radius: 6px; margin: 1rem 0; padding: 0 1rem 1rem; }
.method { border-radius: 4px; color: #fff; font-weight: bold; padding: 0 .4rem; }
.get { background: #2b6cb0; } .post { background: #2f855a; } .delete { background: #c53030; }
code, pre { background: #f5f5f5; border-radius: 4px; font-size: 13px; }
pre { overflow-x: auto; padding: .5rem; white-space: pre-wrap; }
table { border-collapse: collapse; width: 100%; }
td, th { border-bottom: 1px solid #eee; padding: .25rem .5rem; text-align: left; }
td { vertical-align: top; }
.text { white-space: pre-wrap; }
"""


async def docs(request: web.Request) -> web.Response:
    """The API description as a readable page."""
    page = render_page(request.app[settings_key])
    return web.Response(text=page, content_type="text/html")


@functools.lru_cache(maxsize=4)
def render_page(settings: Settings) -> str:
    """The page for the document of a worker running with `settings`."""
    return render_document(build_document(settings))


def render_document(document: Spec) -> str:
    """HTML for an OpenAPI document: overview, then every operation, then the schemas."""
    info = document["info"]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(info['title'])} API</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(info['title'])} <small>{_e(info['version'])}</small></h1>",
        f"<p>{_prose(info.get('summary', ''))}</p>",
        f'<p class="text">{_prose(info.get("description", ""))}</p>',
        '<p>Machine-readable: <a href="openapi.json">openapi.json</a> (OpenAPI '
        f"{_e(document['openapi'])}).</p>",
        "<h2>Endpoints</h2>",
    ]
    for path, item in document["paths"].items():
        shared = item.get("parameters", [])
        for method in _METHODS:
            if method in item:
                parts.append(_operation(document, path, method, item[method], shared))
    parts.append("<h2>Schemas</h2>")
    for name, schema in document["components"]["schemas"].items():
        parts.append(f'<h3 id="schema-{_e(name)}">{_e(name)}</h3>{_json(schema)}')
    parts.append("</body></html>")
    return "\n".join(parts)


def _operation(document: Spec, path: str, method: str, op: Spec, shared: list[Spec]) -> str:
    parts = [
        '<section class="op">',
        f'<h3><span class="method {method}">{method.upper()}</span> <code>{_e(path)}</code> '
        f"{_prose(op.get('summary', ''))}</h3>",
    ]
    if "description" in op:
        parts.append(f'<p class="text">{_prose(op["description"])}</p>')
    if "security" in op:
        anonymous = any(not requirement for requirement in op["security"])
        parts.append(
            "<p><strong>Auth:</strong> bearer token"
            + (" (optional in this deployment)" if anonymous else " required")
            + "</p>"
        )
    parameters = [_resolve(document, p) for p in [*shared, *op.get("parameters", [])]]
    if parameters:
        parts.append(
            "<table><tr><th>Parameter</th><th>In</th><th>Required</th><th>Schema</th>"
            "<th>Description</th></tr>"
        )
        parts.extend(
            f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td>"
            f"<td>{'yes' if p.get('required') else 'no'}</td>"
            f"<td><code>{_e(json.dumps(p.get('schema', {})))}</code></td>"
            f"<td>{_prose(p.get('description', ''))}</td></tr>"
            for p in parameters
        )
        parts.append("</table>")
    body = op.get("requestBody")
    if body:
        for media_type, content in body["content"].items():
            parts.append(f"<p><strong>Request body</strong> <code>{_e(media_type)}</code></p>")
            parts.append(_json(content["schema"]))
    parts.append("<table><tr><th>Status</th><th>Meaning</th><th>Body</th></tr>")
    for status, node in op["responses"].items():
        response = _resolve(document, node)
        media = ", ".join(response.get("content", {})) or "—"
        parts.append(
            f"<tr><td>{_e(status)}</td><td>{_prose(response.get('description', ''))}</td>"
            f"<td><code>{_e(media)}</code></td></tr>"
        )
    parts.append("</table></section>")
    return "\n".join(parts)


def _resolve(document: Spec, node: Spec) -> Spec:
    """Follow a local `$ref` (`#/components/...`) one level."""
    ref = node.get("$ref")
    if not isinstance(ref, str):
        return node
    target: Any = document
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    resolved: Spec = target
    return resolved


def _json(value: Any) -> str:
    return f"<pre>{_e(json.dumps(value, indent=2, ensure_ascii=False))}</pre>"


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


_INLINE_CODE = re.compile(r"`([^`\n]+)`")


def _prose(value: Any) -> str:
    """Escaped text whose Markdown `code spans` become <code> elements (all the markup the
    descriptions use); escaping first means nothing inside a span can form a tag."""
    return _INLINE_CODE.sub(r"<code>\1</code>", _e(value))
