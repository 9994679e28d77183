"""`make api-docs`: docs/API.md, the API reference of this repository, generated from openapi.yaml.

    python scripts/api_docs.py          write docs/API.md
    python scripts/api_docs.py --check  change nothing; exit 1 when docs/API.md differs

For every operation: method and path, authentication, parameters, request fields, the success
status with its headers and fields, and each error status with its codes. openapi.yaml follows the
upstream contract (../shared/API.md, beside the repository); infra/tests/test_api_docs.py fails
when docs/API.md is not what this script makes of openapi.yaml.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OPENAPI = REPO / "openapi.yaml"
API_DOC = REPO / "docs" / "API.md"
METHODS = ["get", "put", "post", "delete", "options", "head", "patch", "trace"]


def load(path: Path = OPENAPI) -> dict:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


class Renderer:
    def __init__(self, spec: dict):
        self.spec = spec

    # ------------------------------------------------------------------------- schema helpers

    def target(self, ref: str) -> dict:
        if not ref.startswith("#/"):
            raise ValueError(f"only local references are used: {ref}")
        node = self.spec
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def resolve(self, node):
        """Follows `$ref`s until the node is not a bare reference."""
        while isinstance(node, dict) and "$ref" in node:
            node = self.target(node["$ref"])
        return node

    def merged(self, node: dict) -> dict:
        """A property's schema with its `$ref` or one-element `allOf` folded in; the property's
        own keys (description, default) win."""
        node = dict(node)
        if "$ref" in node:
            base = self.merged(self.target(node.pop("$ref")))
            return {**base, **node}
        if "allOf" in node and len(node["allOf"]) == 1:
            base = self.merged(node.pop("allOf")[0])
            return {**base, **node}
        return node

    def nullable(self, node: dict) -> tuple[dict, bool]:
        """(the schema, may be null) for `oneOf: [X, {type: null}]` and `type: [X, "null"]`."""
        choices = node.get("oneOf")
        if choices and len(choices) == 2 and {"type": "null"} in choices:
            other = next(c for c in choices if c != {"type": "null"})
            rest = {k: v for k, v in node.items() if k != "oneOf"}
            return {**self.merged(other), **rest}, True
        kind = node.get("type")
        if isinstance(kind, list) and "null" in kind and len(kind) == 2:
            return {**node, "type": next(k for k in kind if k != "null")}, True
        return node, False

    def type_text(self, node: dict) -> str:
        node, may_be_null = self.nullable(self.merged(node))
        if "const" in node:
            text = f"`{json.dumps(node['const'])}`"
        elif "enum" in node:
            text = "one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"])
        else:
            kind = node.get("type", "object" if "properties" in node else "any")
            if kind == "array":
                text = f"array of {self.type_text(node.get('items', {}))}"
                bounds = range_text(node.get("minItems"), node.get("maxItems"))
                if bounds:
                    text += f", {bounds} items"
            else:
                text = str(kind)
                if "format" in node:
                    text += f" ({node['format']})"
                if "contentEncoding" in node:
                    text += f" ({node['contentEncoding']})"
                if kind == "integer":
                    bounds = range_text(node.get("minimum"), node.get("maximum"))
                    if bounds:
                        text += f", {bounds}"
                if kind == "string":
                    bounds = range_text(node.get("minLength"), node.get("maxLength"))
                    if bounds:
                        text += f", {bounds} characters"
        if "default" in node:
            text += f", default `{json.dumps(node['default'])}`"
        if may_be_null:
            text += ", or null"
        return text

    def fields(self, schema: dict, indent: str = "", depth: int = 0) -> list[str]:
        """One bullet per property: name, type, required or optional, description; the fields of
        nested objects (and of arrays of objects) indented below it."""
        schema = self.merged(schema)
        required = set(schema.get("required", []))
        lines = []
        for name, prop in schema.get("properties", {}).items():
            node, _ = self.nullable(self.merged(prop))
            need = "required" if name in required else "optional"
            text = f"{indent}- `{name}` ({self.type_text(prop)}; {need})"
            description = one_line(node.get("description", ""))
            lines.append(f"{text}: {description}" if description else text)
            inner = node.get("items", {}) if node.get("type") == "array" else node
            inner = self.merged(inner) if isinstance(inner, dict) else {}
            if inner.get("properties") and depth < 4:
                lines += self.fields(inner, indent + "  ", depth + 1)
        return lines

    def error_codes(self, response: dict) -> list[str]:
        """The codes an error response narrows `error` to."""
        schema = self.resolve(response.get("content", {}).get("application/json", {}).get("schema", {}))
        error = schema.get("properties", {}).get("error", {})
        if "const" in error:
            return [error["const"]]
        return list(error.get("enum", []))

    # ------------------------------------------------------------------------- operations

    def operations(self) -> list[tuple[str, str, dict]]:
        """[(METHOD, path, operation)] in the order of openapi.yaml."""
        return [
            (method.upper(), path, item[method])
            for path, item in self.spec["paths"].items()
            for method in item
            if method in METHODS
        ]

    def auth_text(self, op: dict) -> str:
        requirements = op.get("security", self.spec.get("security", []))
        if not requirements:
            return "none"
        names = [" and ".join(f"`{n}`" for n in r) if r else "none" for r in requirements]
        return " or ".join(names)

    def success(self, op: dict) -> tuple[str, dict]:
        status = min(s for s in op["responses"] if str(s) < "400")
        return str(status), self.resolve(op["responses"][status])

    def operation(self, method: str, path: str, op: dict) -> list[str]:
        lines = [f"### {method} {path}", "", f"{op.get('summary', '').strip()}.".replace("..", "."), ""]
        lines += [f"- Operation: `{op['operationId']}`", f"- Auth: {self.auth_text(op)}", ""]
        if op.get("description"):
            lines += [one_line(op["description"]), ""]
        parameters = [self.resolve(p) for p in op.get("parameters", [])]
        if parameters:
            lines += ["**Parameters**", ""]
            for p in parameters:
                need = "required" if p.get("required") else "optional"
                text = f"- `{p['name']}` ({p['in']}, {self.type_text(p.get('schema', {}))}; {need})"
                description = one_line(p.get("description", ""))
                lines.append(f"{text}: {description}" if description else text)
            lines.append("")
        if "requestBody" in op:
            body = self.resolve(op["requestBody"])
            for media, content in body["content"].items():
                schema = self.merged(content["schema"])
                lines += [f"**Request body** (`{media}`{'' if body.get('required') else ', optional'})", ""]
                if schema.get("description"):
                    lines += [one_line(schema["description"]), ""]
                lines += self.fields(schema) + [""]
        status, response = self.success(op)
        lines += [f"**Success: {status}**. {one_line(response.get('description', ''))}", ""]
        headers = response.get("headers", {})
        for name, header in headers.items():
            header = self.resolve(header)
            lines.append(f"- header `{name}`: {one_line(header.get('description', ''))}")
        content = response.get("content", {})
        if not content:
            lines.append("- no body")
        for media, body in content.items():
            schema = self.merged(body.get("schema", {}))
            if media != "application/json":
                lines.append(f"- body: `{media}`, {self.type_text(schema)}")
            else:
                lines += self.fields(schema)
        lines.append("")
        errors = [(str(s), r) for s, r in op["responses"].items() if str(s) >= "400"]
        if errors:
            lines += ["**Errors**", ""]
            for code_status, ref in errors:
                response = self.resolve(ref)
                codes = self.error_codes(response)
                description = one_line(response.get("description", ""))
                if codes and description.startswith(f"`{codes[0]}`"):
                    # The description names its codes itself (`not_found`: no such user...).
                    text = f"- {code_status} {description}"
                else:
                    named = ", ".join(f"`{c}`" for c in codes) or "(no error code)"
                    text = f"- {code_status} {named}: {description}"
                extra = [n for n in response.get("headers", {})]
                if extra:
                    text += " Headers: " + ", ".join(f"`{h}`" for h in extra) + "."
                lines.append(text)
                # Fields an error body adds to the shared ones (devices_changed, readiness).
                body = self.resolve(response.get("content", {}).get("application/json", {}).get("schema", {}))
                added = {k: v for k, v in body.get("properties", {}).items() if k not in ("error", "message", "field")}
                if added:
                    required = [k for k in body.get("required", []) if k in added]
                    lines += self.fields({"properties": added, "required": required}, "  ")
            lines.append("")
        return lines

    # ------------------------------------------------------------------------- the document

    def error_table(self) -> list[str]:
        """Each code of `ErrorCode` with the statuses it is answered with: those of the operations'
        responses, and those the overview's prose pairs with it (`405 \`method_not_allowed\``:
        the fallback's answers are not listed under each operation)."""
        statuses: dict[str, set[str]] = {}
        for _, _, op in self.operations():
            for status, ref in op["responses"].items():
                for code in self.error_codes(self.resolve(ref)):
                    statuses.setdefault(code, set()).add(str(status))
        for status, code in re.findall(r"\b([45]\d\d)\s+`([a-z_]+)`", self.spec["info"].get("description", "")):
            statuses.setdefault(code, set()).add(status)
        lines = ["| Code | Status |", "| --- | --- |"]
        for code in self.spec["components"]["schemas"]["ErrorCode"]["enum"]:
            found = ", ".join(sorted(statuses.get(code, set()))) or "(none stated)"
            lines.append(f"| `{code}` | {found} |")
        return lines

    def document(self) -> str:
        info = self.spec["info"]
        lines = [
            f"# {info['title']} {info['version']}: API reference",
            "",
            "<!-- Generated from openapi.yaml by scripts/api_docs.py (`make api-docs`); do not edit by hand:",
            "     infra/tests/test_api_docs.py fails when this file differs from what openapi.yaml gives. -->",
            "",
            "The HTTP API of this repository, generated from [`openapi.yaml`](../openapi.yaml) (OpenAPI 3.1,",
            "the machine-readable form with every schema and pattern). Both follow the upstream contract,",
            "`../shared/API.md`, which lives beside the repository: where it is present (CI), the infra",
            "tests hold openapi.yaml and template.yaml to it.",
            "",
            "## Overview",
            "",
            info["description"].strip(),
            "",
            "## Servers",
            "",
        ]
        for server in self.spec.get("servers", []):
            lines.append(f"- `{server['url']}`: {one_line(server.get('description', ''))}")
        lines += ["", "## Authentication", ""]
        for name, scheme in self.spec["components"]["securitySchemes"].items():
            kind = f"{scheme['type']} {scheme.get('scheme', '')}".strip()
            if scheme.get("bearerFormat"):
                kind += f" ({scheme['bearerFormat']})"
            lines.append(f"- `{name}`, {kind}: {one_line(scheme.get('description', ''))}")
        default = self.auth_text({})
        lines += ["", f"An operation without its own `security` takes the default: {default}.", ""]
        lines += ["## Error codes", "", "Every error body is `{\"error\": \"<code>\", \"message\": \"<text>\"}`"
                  " (a validation error may add `field`).", ""]
        lines += self.error_table() + [""]
        lines += ["## Endpoints", "", "| Method | Path | Auth | Success | Summary |", "| --- | --- | --- | --- | --- |"]
        for method, path, op in self.operations():
            status, _ = self.success(op)
            lines.append(f"| {method} | `{path}` | {self.auth_text(op)} | {status} | {one_line(op.get('summary', ''))} |")
        lines.append("")
        tags = [t["name"] for t in self.spec.get("tags", [])]
        for method, path, op in self.operations():
            for tag in op.get("tags", []):
                if tag not in tags:
                    tags.append(tag)
        for tag in tags:
            ops = [(m, p, op) for m, p, op in self.operations() if tag in op.get("tags", [])]
            if not ops:
                continue
            lines += [f"## {tag[0].upper()}{tag[1:]}", ""]
            for method, path, op in ops:
                lines += self.operation(method, path, op)
        untagged = [(m, p, op) for m, p, op in self.operations() if not op.get("tags")]
        if untagged:
            lines += ["## Other", ""]
            for method, path, op in untagged:
                lines += self.operation(method, path, op)
        while lines and lines[-1] == "":
            lines.pop()
        return "\n".join(line.rstrip() for line in lines) + "\n"


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def range_text(low, high) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f"at least {low}"
    if low is None:
        return f"at most {high}"
    return f"{low}" if low == high else f"{low}..{high}"


def render(spec: dict | None = None) -> str:
    return Renderer(spec if spec is not None else load()).document()


def main(argv: list[str]) -> int:
    check = "--check" in argv[1:]
    text = render()
    if check:
        current = API_DOC.read_text(encoding="utf-8") if API_DOC.is_file() else None
        if current != text:
            print(f"{API_DOC.relative_to(REPO)} differs from openapi.yaml: run `make api-docs`", file=sys.stderr)
            return 1
        return 0
    API_DOC.parent.mkdir(parents=True, exist_ok=True)
    if not API_DOC.is_file() or API_DOC.read_text(encoding="utf-8") != text:
        API_DOC.write_text(text, encoding="utf-8")
        print(f"wrote {API_DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
