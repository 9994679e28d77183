"""openapi.yaml against the contract (API.md) and the deployed routes (template.yaml).

The fifth route table: openapi.yaml must describe exactly the routes of template.yaml's HttpApi
events and API.md's headings, document every error the contract lets each endpoint answer with the
shared error body, and be a valid OpenAPI 3.1 document. scripts/fuzz-api.sh then holds the running
binaries to it.

Run: .venv/bin/python -m unittest discover -s infra/tests -v   (infra/check.sh does).
Needs PyYAML and openapi-spec-validator (requirements-dev.txt).
"""

from __future__ import annotations

import functools
import re
import sys
import unittest
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_template import (  # noqa: E402
    API_MD,
    REPO,
    contract_routes,
    needs_contract,
    normalise,
    template_routes,
    without_contract_checks as load_tests,
)

OPENAPI = REPO / "openapi.yaml"
ERROR_REF = "#/components/schemas/Error"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Endpoints that never touch the database: no 500 or 503 (API.md: liveness "touches nothing").
NO_DATABASE = {("GET", "/health")}
# Readiness answers its own 503 body (the error body plus status and database) and never 500.
NO_INTERNAL_ERROR = NO_DATABASE | {("GET", "/health/ready")}


@functools.cache
def spec() -> dict:
    with OPENAPI.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def resolve(node):
    """Follows local `$ref`s (`#/...`) until the node is not a bare reference."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references are used: {ref}"
        target = spec()
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def operations() -> dict[tuple[str, str], dict]:
    """{(METHOD, path): operation} of openapi.yaml."""
    return {
        (method.upper(), path): op
        for path, item in spec()["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


def security_of(op: dict) -> list[dict]:
    return op["security"] if "security" in op else spec().get("security", [])


def requires_bearer(op: dict) -> bool:
    """True when every way to call the operation needs a user's bearer token."""
    requirements = security_of(op)
    return bool(requirements) and all("bearerAuth" in r for r in requirements)


def may_authenticate(op: dict) -> bool:
    """True when some security requirement of the operation is not empty."""
    return any(r for r in security_of(op))


def responses(op: dict) -> dict[str, dict]:
    return {str(code): resolve(r) for code, r in op["responses"].items()}


def refers_to_error(schema: dict) -> bool:
    """The schema is the shared error schema or extends it (allOf), through references."""
    if schema.get("$ref") == ERROR_REF:
        return True
    if any(refers_to_error(s) for s in schema.get("allOf", [])):
        return True
    if "$ref" in schema:
        return refers_to_error(resolve(schema))
    return False


def narrowed_codes(schema: dict) -> set[str]:
    """The error codes a response pins with `properties.error.const` (or `enum`, where one
    status has two codes, e.g. 429 `rate_limited` and `mailbox_full`), through references."""
    error = resolve(schema).get("properties", {}).get("error", {})
    if "const" in error:
        return {error["const"]}
    return set(error.get("enum", []))


def contract_text() -> str:
    return API_MD.read_text(encoding="utf-8")


def contract_error_table() -> dict[str, int]:
    """{error code: status} from API.md's table of codes."""
    rows = re.findall(r"^\|\s*(\d{3})\s*\|\s*`([a-z_]+)`\s*\|", contract_text(), re.M)
    return {code: int(status) for status, code in rows}


def contract_sections() -> dict[tuple[str, str], str]:
    """{(METHOD, normalised path): the text of its `### METHOD /path` section} of API.md."""
    text = contract_text()
    heads = list(re.finditer(r"^###\s+(GET|POST|PUT|PATCH|DELETE)\s+(/\S*)(.*)$", text, re.M))
    sections = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        chapter = text.find("\n## ", head.end())  # the next `##` chapter ends the last section
        if chapter != -1:
            end = min(end, chapter)
        sections[(head.group(1), normalise(head.group(2)))] = text[head.start():end]
    return sections


def contract_authenticated() -> set[tuple[str, str]]:
    """The endpoints API.md marks `(auth)` in their heading."""
    return {key for key, section in contract_sections().items() if "(auth)" in section.splitlines()[0]}


def first_object(text: str) -> str:
    """The first balanced `{...}` of the text (nested objects and arrays included)."""
    start = text.index("{")
    depth = 0
    for i, ch in enumerate(text[start:], start):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return text[start:i + 1]
    raise ValueError(f"unbalanced braces in {text[:80]!r}")


def top_level(body: str) -> str:
    """The object's text with everything nested inside it (objects, arrays) left out, so only its
    own keys remain: `{"a", "b": [{"c"}]}` gives `{"a", "b": }`."""
    out, depth = [], 0
    for ch in body:
        if ch in "[{":
            depth += 1
            if depth == 1:
                out.append(ch)
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                out.append(ch)
        elif depth == 1:
            out.append(ch)
    return "".join(out)


class OpenApiIsValid(unittest.TestCase):
    def test_validates_as_openapi_3_1(self):
        from openapi_spec_validator import OpenAPIV31SpecValidator, validate

        self.assertRegex(str(spec()["openapi"]), r"^3\.1\.\d+$")
        validate(spec(), cls=OpenAPIV31SpecValidator)

    def test_every_reference_resolves(self):
        def walk(node):
            if isinstance(node, dict):
                if isinstance(node.get("$ref"), str):
                    resolve({"$ref": node["$ref"]})
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(spec())

    def test_operation_ids_are_unique(self):
        ids = [op.get("operationId") for op in operations().values()]
        self.assertTrue(all(ids), "every operation has an operationId")
        self.assertEqual(len(ids), len(set(ids)))


class RoutesAgree(unittest.TestCase):
    """openapi.yaml, template.yaml's HttpApi routes and API.md's headings: the same routes."""

    def test_matches_template_exactly(self):
        routes, default = template_routes()
        self.assertEqual(len(default), 1, "one $default route (the 404/405 fallback)")
        template = {(method, path) for method, path, _ in routes}
        ours = set(operations())
        self.assertEqual(
            ours, template,
            f"\nonly in openapi.yaml: {sorted(ours - template)}"
            f"\nonly in template.yaml: {sorted(template - ours)}",
        )

    @needs_contract
    def test_matches_contract(self):
        ours = {(method, normalise(path)) for method, path in operations()}
        contract = contract_routes()
        self.assertEqual(
            ours, contract,
            f"\nonly in openapi.yaml: {sorted(ours - contract)}"
            f"\nonly in API.md: {sorted(contract - ours)}",
        )

    def test_path_parameters_are_declared(self):
        for (method, path), op in operations().items():
            with self.subTest(operation=f"{method} {path}"):
                declared = {
                    p["name"] for p in map(resolve, op.get("parameters", [])) if p["in"] == "path"
                }
                self.assertEqual(declared, set(re.findall(r"\{([^}]+)\}", path)))


class Authentication(unittest.TestCase):
    def test_security_schemes(self):
        schemes = spec()["components"]["securitySchemes"]
        self.assertEqual(schemes["bearerAuth"]["type"], "http")
        self.assertEqual(schemes["bearerAuth"]["scheme"], "bearer")
        self.assertEqual(schemes["bearerAuth"]["bearerFormat"], "JWT")
        self.assertEqual(spec()["security"], [{"bearerAuth": []}], "bearer JWT is the global default")

    @needs_contract
    def test_authenticated_operations_are_the_contracts(self):
        ours = {(m, normalise(p)) for (m, p), op in operations().items() if requires_bearer(op)}
        self.assertEqual(ours, contract_authenticated(), "the (auth) endpoints of API.md")

    def test_open_operations_override_the_global_security(self):
        for key in (("POST", "/register"), ("POST", "/login"), ("GET", "/health"), ("GET", "/health/ready")):
            with self.subTest(operation=key):
                self.assertEqual(operations()[key].get("security"), [])

    def test_metrics_token_is_optional(self):
        security = operations()[("GET", "/metrics")]["security"]
        self.assertIn({}, security)
        self.assertIn({"metricsToken": []}, security)

    def test_authenticated_operations_document_401_with_www_authenticate(self):
        for (method, path), op in operations().items():
            if not may_authenticate(op):
                continue
            with self.subTest(operation=f"{method} {path}"):
                self.assertIn("401", op["responses"])
                response = responses(op)["401"]
                self.assertIn("unauthorized", narrowed_codes(response["content"]["application/json"]["schema"]))
                header = resolve(response.get("headers", {}).get("WWW-Authenticate", {}))
                self.assertIs(header.get("required"), True, "401 carries WWW-Authenticate: Bearer")

    def test_login_401_is_invalid_credentials(self):
        response = responses(operations()[("POST", "/login")])["401"]
        self.assertEqual(narrowed_codes(response["content"]["application/json"]["schema"]), {"invalid_credentials"})
        header = resolve(response.get("headers", {}).get("WWW-Authenticate", {}))
        self.assertIs(header.get("required"), True, "every 401 carries WWW-Authenticate: Bearer")

    def test_account_deletion_401_is_either(self):
        response = responses(operations()[("DELETE", "/me")])["401"]
        codes = narrowed_codes(response["content"]["application/json"]["schema"])
        self.assertEqual(codes, {"unauthorized", "invalid_credentials"})


class ErrorResponses(unittest.TestCase):
    @needs_contract
    def test_error_codes_are_the_contracts(self):
        enum = spec()["components"]["schemas"]["ErrorCode"]["enum"]
        self.assertEqual(sorted(enum), sorted(contract_error_table()))

    def test_error_schema(self):
        error = spec()["components"]["schemas"]["Error"]
        self.assertEqual(sorted(error["required"]), ["error", "message"])
        self.assertEqual(set(error["properties"]), {"error", "message", "field"})
        self.assertEqual(error["properties"]["error"], {"$ref": "#/components/schemas/ErrorCode"})

    def test_every_error_response_uses_the_shared_error_schema(self):
        for (method, path), op in operations().items():
            for status, response in responses(op).items():
                if int(status) < 400:
                    continue
                with self.subTest(operation=f"{method} {path}", status=status):
                    content = response.get("content", {})
                    self.assertEqual(list(content), ["application/json"])
                    schema = content["application/json"]["schema"]
                    self.assertTrue(refers_to_error(schema), "must reference #/components/schemas/Error")
                    self.assertTrue(narrowed_codes(schema), "each error response pins its code(s)")
                    self.assertIs(resolve(schema).get("unevaluatedProperties"), False, "closed body")

    @needs_contract
    def test_every_error_code_has_the_contracts_status(self):
        table = contract_error_table()
        for (method, path), op in operations().items():
            for status, response in responses(op).items():
                if int(status) < 400:
                    continue
                with self.subTest(operation=f"{method} {path}", status=status):
                    for code in narrowed_codes(response["content"]["application/json"]["schema"]):
                        self.assertEqual(table[code], int(status), f"API.md gives {code} status {table[code]}")

    def test_error_headers(self):
        components = spec()["components"]["responses"]
        for name, header in (("RateLimited", "Retry-After"), ("MethodNotAllowed", "Allow"),
                             ("Unauthorized", "WWW-Authenticate")):
            with self.subTest(response=name):
                self.assertIs(resolve(components[name]["headers"][header])["required"], True)

    def test_database_errors_are_documented(self):
        for key, op in operations().items():
            codes = set(op["responses"])
            with self.subTest(operation=key):
                self.assertEqual("503" in codes, key not in NO_DATABASE)
                self.assertEqual("500" in codes, key not in NO_INTERNAL_ERROR)

    @needs_contract
    def test_statuses_of_the_contract_sections(self):
        """Every status API.md names in an endpoint's section (bold successes, and the error
        statuses in its prose) is documented for that operation, and no other success."""
        sections = contract_sections()
        for (method, path), op in operations().items():
            section = sections[(method, normalise(path))]
            codes = set(op["responses"])
            with self.subTest(operation=f"{method} {path}"):
                # /metrics names no status for its exposition: a plain 200.
                bold = set(re.findall(r"\*\*(\d{3})\*\*", section)) or {"200"}
                self.assertLessEqual(bold, codes)
                self.assertEqual({c for c in codes if c < "400"}, {c for c in bold if c < "400"})
                mentioned = set(re.findall(r"\b([45]\d\d)\b", section))
                self.assertLessEqual(mentioned, codes)

    @needs_contract
    def test_every_status_is_one_of_the_contract(self):
        allowed = {str(s) for s in contract_error_table().values()} | {"200", "201", "204"}
        for (method, path), op in operations().items():
            with self.subTest(operation=f"{method} {path}"):
                self.assertLessEqual(set(op["responses"]), allowed)

    def test_body_endpoints_document_the_body_errors(self):
        for (method, path), op in operations().items():
            if "requestBody" not in op:
                continue
            with self.subTest(operation=f"{method} {path}"):
                self.assertLessEqual({"400", "413", "422"}, set(op["responses"]))
                self.assertEqual(list(resolve(op["requestBody"])["content"]), ["application/json"])


class ResponsesAndFields(unittest.TestCase):
    def test_no_content_has_no_body(self):
        response = responses(operations()[("PUT", "/messages/{id}/delivered")])["204"]
        self.assertNotIn("content", response)

    def test_metrics_is_text(self):
        response = responses(operations()[("GET", "/metrics")])["200"]
        self.assertEqual(list(response["content"]), ["text/plain"])

    def test_field_rules(self):
        schemas = spec()["components"]["schemas"]
        self.assertEqual(schemas["Name"]["pattern"], "^[A-Za-z0-9_.-]{3,32}$")
        self.assertEqual((schemas["Password"]["minLength"], schemas["Password"]["maxLength"]), (8, 72))
        self.assertIn("bytes", schemas["Password"]["description"])
        self.assertEqual(schemas["Id"]["format"], "uuid")
        self.assertEqual(schemas["Timestamp"]["format"], "date-time")
        limit = resolve(spec()["components"]["parameters"]["Limit"])["schema"]
        self.assertEqual((limit["type"], limit["minimum"], limit["maximum"], limit["default"]),
                         ("integer", 1, 500, 100))

    @needs_contract
    def test_limit_rule_is_the_contracts(self):
        self.assertIn("`limit` (1..500, default 100)", contract_text())

    def test_request_bodies_allow_unknown_fields(self):
        for (method, path), op in operations().items():
            if "requestBody" not in op:
                continue
            with self.subTest(operation=f"{method} {path}"):
                schema = resolve(resolve(op["requestBody"])["content"]["application/json"]["schema"])
                self.assertNotIn(schema.get("additionalProperties"), (False, {}))

    def test_response_bodies_are_closed(self):
        for (method, path), op in operations().items():
            for status, response in responses(op).items():
                content = response.get("content", {}).get("application/json")
                if int(status) >= 400 or not content:
                    continue
                with self.subTest(operation=f"{method} {path}", status=status):
                    self.assertIs(resolve(content["schema"]).get("additionalProperties"), False)

    @needs_contract
    def test_response_fields_are_the_contracts(self):
        """The success body fields of each operation are the ones API.md lists for it."""
        sections = contract_sections()
        for (method, path), op in operations().items():
            content = responses(op)[min(c for c in op["responses"] if c < "400")].get("content", {})
            if "application/json" not in content:
                continue
            schema = resolve(content["application/json"]["schema"])
            section = sections[(method, normalise(path))]
            arrow = section.split("→", 1)[-1] if "→" in section else section
            outer = top_level(first_object(arrow))
            listed = set(re.findall(r'[{,]\s*"([a-z_]+)"', outer))  # keys, not values like "ok"
            with self.subTest(operation=f"{method} {path}"):
                self.assertEqual(set(schema["properties"]), listed)


if __name__ == "__main__":
    unittest.main()
