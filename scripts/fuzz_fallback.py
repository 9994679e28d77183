"""The routing answers openapi.yaml states only in prose, probed for every documented path.

schemathesis sends only the documented paths (and, for 405, undocumented methods on them), so
scripts/fuzz-api.sh runs these after it: unknown paths are 404 `not_found`; a documented path with
a method it does not list is 405 `method_not_allowed` with `Allow` naming exactly the documented
methods; a near miss of a documented path (trailing slash, doubled slash, extra segment) is never
a 5xx, and any error it gets has the contract's body.

Usage: fuzz_fallback.py OPENAPI BASE_URL TOKEN   (prints one line per failure and a summary line)
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request

import yaml

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
NIL = "00000000-0000-0000-0000-000000000000"


def call(base: str, method: str, path: str, token: str) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(base + path, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def main() -> int:
    spec_path, base, token = sys.argv[1:4]
    with open(spec_path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    codes = set(spec["components"]["schemas"]["ErrorCode"]["enum"])
    passed, failures = 0, []

    def check(what: str, ok: bool, status: int, body: bytes):
        nonlocal passed
        if ok:
            passed += 1
        else:
            failures.append(f"FAIL: {what}: got {status} {body[:200].decode('utf-8', 'replace')}")

    def error_body(status: int, body: bytes, code: str | None = None) -> bool:
        try:
            parsed = json.loads(body)
        except ValueError:
            return False
        return (
            isinstance(parsed, dict)
            and parsed.get("error") in codes
            and isinstance(parsed.get("message"), str)
            and (code is None or parsed["error"] == code)
        )

    for path, item in spec["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", NIL, path)
        documented = {m.upper() for m in item if m.upper() in METHODS}
        for method in sorted(set(METHODS) - documented):
            status, headers, body = call(base, method, concrete, token)
            allow = {m.strip() for m in headers.get("Allow", headers.get("allow", "")).split(",") if m.strip()}
            check(f"{method} {concrete} is 405 with Allow: {', '.join(sorted(documented))}",
                  status == 405 and allow == documented and error_body(status, body, "method_not_allowed"),
                  status, body)
        for method in sorted(documented):
            for variant in (concrete + "/", concrete + "//", concrete + "/extra"):
                status, _, body = call(base, method, variant, token)
                check(f"{method} {variant} is not a server error and has the error body",
                      status < 500 and (status < 400 or error_body(status, body)), status, body)
    for path in ("/", "/nowhere", "/messages/x/y/z", "/health/ready/now"):
        status, _, body = call(base, "GET", path, token)
        check(f"GET {path} is 404 not_found", status == 404 and error_body(status, body, "not_found"), status, body)

    for line in failures:
        print(line)
    print(f"fallback probes: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
