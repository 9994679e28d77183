"""`make routes`: functions/src/routes.rs is the one route table; this writes what follows from it.

    python scripts/routes.py          write: the `cargo lambda watch` router in Cargo.toml, a
                                      5-line binary for a new function, and a template.yaml
                                      resource for a function it does not have yet
    python scripts/routes.py --check  change nothing; exit 1 when any of those differ, or when
                                      template.yaml or openapi.yaml lack a route (make test)

openapi.yaml is checked, never written: an operation needs its schemas and prose from a person.
infra/tests hold API.md, template.yaml and openapi.yaml together in more detail.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUTES_RS = REPO / "functions" / "src" / "routes.rs"
CARGO_TOML = REPO / "Cargo.toml"
TEMPLATE = REPO / "template.yaml"
OPENAPI = REPO / "openapi.yaml"
BIN_DIR = REPO / "functions" / "src" / "bin"
ROUTER_HEADER = "[workspace.metadata.lambda.watch.router]"
# Every method of a known path reaches a function locally: the emulator needs each one named.
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "QUERY"]
BACKGROUND_MARKER = "  # ---------------------------------------------------------------- background functions"

sys.path.insert(0, str(REPO / "infra" / "tests"))


def table() -> list[tuple[str, str, str, str]]:
    """[(METHOD, path, function, handler module)] from the `routes!` invocation, in order."""
    text = ROUTES_RS.read_text(encoding="utf-8")
    body = text[text.index("routes! {"):]
    found = []
    for function, module, routes in re.findall(r'^\s*"([a-z-]+)" => (\w+)::handler: (.+);$', body, re.M):
        for method, path in re.findall(r'([A-Z]+) "(/[^"]*)"', routes):
            found.append((method, path, function, module))
    if not found:
        raise SystemExit(f"no routes found in {ROUTES_RS}")
    return found


def router_block(routes) -> str:
    paths: dict[str, list[tuple[str, str]]] = {}
    for method, path, function, _ in routes:
        paths.setdefault(path, []).append((method, function))
    lines = [ROUTER_HEADER]
    for path, routed in paths.items():
        lines.append(f'"{path}" = [')
        taken = {m for m, _ in routed}
        entries = routed + [(m, "not-found") for m in METHODS if m not in taken]
        lines += [f'    {{ method = "{m}", function = "{f}" }},' for m, f in entries]
        lines.append("]")
    lines += ['"/" = "not-found"', '"/{*path}" = "not-found"']
    return "\n".join(lines) + "\n"


def cargo_toml(routes) -> tuple[str, str]:
    text = CARGO_TOML.read_text(encoding="utf-8")
    start = text.index(ROUTER_HEADER)
    end = text.find("\n[", start + len(ROUTER_HEADER))
    tail = text[end + 1:] if end != -1 else ""
    return text, text[:start] + router_block(routes) + ("\n" + tail if tail else "")


def binary_source(function: str, module: str) -> str:
    return (
        f"//! Lambda binary for `functions::{module}`.\n\n"
        '#[tokio::main(flavor = "current_thread")]\n'
        "async fn main() -> Result<(), lambda_http::Error> {\n"
        f'    common::runtime::run_http("{function}", common::Tokens::Used, functions::{module}::handler)\n'
        "        .await\n"
        "}\n"
    )


def logical_id(function: str) -> str:
    return "".join(part.capitalize() for part in function.split("-")) + "Function"


def template_resource(function: str, routes) -> str:
    events = []
    for method, path, fn, _ in routes:
        if fn == function:
            name = logical_id(function)[: -len("Function")] + (str(len(events) + 1) if events else "")
            events.append(
                f"        {name}:\n          Type: HttpApi\n          Properties:\n"
                f"            ApiId: !Ref HttpApi\n            Method: {method}\n            Path: {path}\n"
            )
    return (
        f"  {logical_id(function)}:\n    Type: AWS::Serverless::Function\n    Metadata:\n"
        f"      BuildMethod: rust-cargolambda\n      BuildProperties:\n        Binary: {function}\n"
        f"    Properties:\n      Policies: [!Ref DbConnectPolicy]\n      Events:\n" + "".join(events) + "\n"
    )


def main(check: bool) -> int:
    from test_openapi import operations
    from test_template import functions as template_functions
    from test_template import binary_of, template_routes

    routes = table()
    problems, written = [], []

    before, after = cargo_toml(routes)
    if before != after:
        if check:
            problems.append("Cargo.toml's watch router differs from routes.rs (run `make routes`)")
        else:
            CARGO_TOML.write_text(after, encoding="utf-8")
            written.append("Cargo.toml (watch router)")

    functions = {(f, m) for _, _, f, m in routes}
    for function, module in sorted(functions):
        binary = BIN_DIR / f"{function}.rs"
        if not binary.exists():
            if check:
                problems.append(f"no binary {binary.relative_to(REPO)} (run `make routes`)")
            else:
                binary.write_text(binary_source(function, module), encoding="utf-8")
                subprocess.run(["rustfmt", "--edition", "2024", str(binary)], check=False)
                written.append(str(binary.relative_to(REPO)))

    deployed = {binary_of(fn) for fn in template_functions().values()}
    missing_functions = sorted(f for f, _ in functions if f not in deployed)
    if missing_functions:
        if check:
            problems += [f"template.yaml has no function for {f!r} (run `make routes`)" for f in missing_functions]
        else:
            text = TEMPLATE.read_text(encoding="utf-8")
            added = "".join(template_resource(f, routes) for f in missing_functions)
            TEMPLATE.write_text(text.replace(BACKGROUND_MARKER, added + BACKGROUND_MARKER, 1), encoding="utf-8")
            written += [f"template.yaml ({logical_id(f)})" for f in missing_functions]

    ours = {(m, p, f) for m, p, f, _ in routes}
    if not missing_functions:
        deployed_routes = set(template_routes()[0])
        problems += [f"template.yaml lacks the HttpApi event {m} {p} on {f}" for m, p, f in sorted(ours - deployed_routes)]
        problems += [f"template.yaml routes {m} {p} to {f}, which routes.rs does not" for m, p, f in sorted(deployed_routes - ours)]
    documented = set(operations())
    problems += [f"openapi.yaml has no operation {m.lower()} under {p}" for m, p, _ in sorted(ours) if (m, p) not in documented]
    problems += [f"openapi.yaml documents {m} {p}, which routes.rs does not route" for m, p in sorted(documented - {(m, p) for m, p, _ in ours})]

    for item in written:
        print(f"routes: wrote {item}")
    for problem in problems:
        print(f"routes: {problem}", file=sys.stderr)
    if not problems:
        print(f"routes: {len(routes)} routes of {len(functions)} functions agree")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv[1:]))
