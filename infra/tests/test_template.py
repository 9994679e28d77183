"""Offline checks of the deployment: template.yaml against the HTTP contract (API.md), the local
`cargo lambda watch` router (Cargo.toml) and the security rules of infra/README.md.

Run: .venv/bin/python -m unittest discover -s infra/tests -v   (infra/check.sh does).
Needs PyYAML; the translated-template checks also use aws-sam-translator (both in .venv).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tomllib
import unittest
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "template.yaml"
INFRA_TEMPLATE = REPO / "infra" / "network-database.yaml"
CARGO_TOML = REPO / "Cargo.toml"
BIN_DIR = REPO / "functions" / "src" / "bin"
CREATE_DB_USER_SQL = REPO / "infra" / "create-db-user.sql"
SAMCONFIG_EXAMPLE = REPO / "infra" / "samconfig.toml.example"
# The contract lives next to the repository; API_MD overrides it (e.g. in another checkout).
API_MD = Path(os.environ.get("API_MD", REPO.parent / "shared" / "API.md"))
# The checks against the contract (marked @needs_contract) run whenever it is there, as in CI. A
# clone without ../shared leaves them out, and the run prints one line saying so (load_tests).
CONTRACT_PRESENT = API_MD.is_file()
CONTRACT_ABSENT = f"{API_MD} is absent (put ../shared beside the repository, as CI has it, or set API_MD)"
_LEFT_OUT: list[str] = []


def needs_contract(test):
    """Marks a test that reads API.md: skipped when the contract is absent."""
    test = unittest.skipUnless(CONTRACT_PRESENT, CONTRACT_ABSENT)(test)
    test.needs_contract = True
    return test


def _each_test(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _each_test(test)
        else:
            yield test


def without_contract_checks(loader, tests, pattern):
    """load_tests of every module with contract checks: without API.md, the @needs_contract tests
    are left out (and counted) so that they make one line, not one skip each."""
    if CONTRACT_PRESENT:
        return tests
    kept = unittest.TestSuite()
    for test in _each_test(tests):
        method = getattr(test, getattr(test, "_testMethodName", ""), None)
        if getattr(method, "needs_contract", False):
            _LEFT_OUT.append(test.id())
        else:
            kept.addTest(test)
    return kept


def load_tests(loader, tests, pattern):
    tests = without_contract_checks(loader, tests, pattern)
    if not CONTRACT_PRESENT:
        class ChecksAgainstTheContract(unittest.TestCase):
            __qualname__ = "ChecksAgainstTheContract"

            def test_skipped(self):
                # Discovery loads every module before any test runs: the count is all of them.
                self.skipTest(f"{len(_LEFT_OUT)} checks against the contract skipped: {CONTRACT_ABSENT}")

        tests.addTest(ChecksAgainstTheContract("test_skipped"))
    return tests

# Every Lambda binary of the `functions` crate, and the ones that never touch the DB.
EXPECTED_BINARIES = {
    "register", "login", "me", "get-public-key", "update-key", "lookup-user", "health",
    "send-message", "get-messages", "confirm-delivery", "confirm-deliveries", "delete-account",
    "metrics", "not-found", "purge", "migrate",
    # Devices and prekeys (API.md "Devices", "Prekeys").
    "create-link-code", "link-device", "my-devices", "user-devices", "remove-device",
    "send-to-devices", "set-signing-key", "upload-prekeys", "prekey-count", "get-keys",
    "claim-prekeys",
}
# The one-shot operator function (infra/README.md step 3): no route, no trigger, no IAM
# database access (it logs in once as the master user, with the password in its payload).
SETUP_FUNCTION = "setup-roles"
EXPECTED_BINARIES = EXPECTED_BINARIES | {SETUP_FUNCTION}
NO_DATABASE = {"not-found"}
# The functions that check a password (bcrypt), sized for it.
BCRYPT_FUNCTIONS = {"register", "login", "delete-account", "link-device", "remove-device", "set-signing-key"}

# Variables the shared Config reads beyond API.md's table (AWS_REGION is set by Lambda).
CONFIG_EXTENSIONS = {
    "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_IAM_AUTH", "DB_SSL_MODE", "DB_SSL_ROOT_CERT",
    "DB_STATEMENT_CACHE_CAPACITY", "DB_MAX_CONNECTIONS", "DB_ACQUIRE_TIMEOUT_MS",
    "JWT_ISSUER", "JWT_AUDIENCE",
}

# {{resolve:secretsmanager:<id>:SecretString}}, where <id> may be a ${Parameter} of an Fn::Sub.
DYNAMIC_SECRET_REF = re.compile(r"^\{\{resolve:(secretsmanager|ssm-secure):(?:[^{}$]|\$\{\w+\})+\}\}$")


# ----------------------------------------------------------------------------- loading


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns CloudFormation short tags (!Ref, !Sub, ...) into their long form."""


def _construct_cfn_tag(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if tag_suffix == "Ref":
        return {"Ref": value}
    if tag_suffix == "Condition":
        return {"Condition": value}
    if tag_suffix == "GetAtt" and isinstance(value, str):
        return {"Fn::GetAtt": value.split(".", 1)}
    return {f"Fn::{tag_suffix}": value}


_CfnLoader.add_multi_constructor("!", _construct_cfn_tag)


@functools.cache
def load_yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return yaml.load(f, Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass


def template() -> dict:
    return load_yaml(TEMPLATE)


def resources(doc: dict, type_: str | None = None) -> dict[str, dict]:
    return {k: v for k, v in doc["Resources"].items() if type_ is None or v["Type"] == type_}


def functions() -> dict[str, dict]:
    return resources(template(), "AWS::Serverless::Function")


def binary_of(function: dict) -> str | None:
    return function.get("Metadata", {}).get("BuildProperties", {}).get("Binary")


def function_by_binary(binary: str) -> tuple[str, dict]:
    for logical_id, fn in functions().items():
        if binary_of(fn) == binary:
            return logical_id, fn
    raise AssertionError(f"no function builds the {binary!r} binary")


def fn_property(fn: dict, name: str):
    """A function property with SAM Globals applied (scalars only: function wins)."""
    props = fn.get("Properties", {})
    if name in props:
        return props[name]
    return template().get("Globals", {}).get("Function", {}).get(name)


def normalise(path: str) -> str:
    """/public-key/{user_id} and /public-key/{id} are the same route for the contract."""
    return re.sub(r"\{[^}]+\}", "{}", path.split("?", 1)[0])


def is_ref(value, name: str | None = None) -> bool:
    return isinstance(value, dict) and set(value) == {"Ref"} and (name is None or value["Ref"] == name)


# ----------------------------------------------------------------------------- route tables


def template_routes() -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(METHOD, path, binary)], [binaries behind $default]) from the HttpApi events."""
    routes, default = [], []
    for fn in functions().values():
        for event in fn.get("Properties", {}).get("Events", {}).values():
            if event.get("Type") != "HttpApi":
                continue
            props = event.get("Properties", {})
            method, path = props.get("Method", "ANY").upper(), props.get("Path")
            if path == "$default":
                default.append(binary_of(fn))
            else:
                routes.append((method, path, binary_of(fn)))
    return routes, default


def router_table() -> tuple[dict[tuple[str, str], str], list[tuple[str, str]]]:
    """({(METHOD, path): function}, [(path, function) of fallbacks]) from Cargo.toml.

    A path mapped to a plain string is a catch-all (any method); a method that a known path maps
    to not-found is that path's 405 answer, also a fallback rather than a route."""
    with CARGO_TOML.open("rb") as f:
        cargo = tomllib.load(f)
    router = cargo["workspace"]["metadata"]["lambda"]["watch"]["router"]
    routes, catch_all = {}, []
    for path, entries in router.items():
        if isinstance(entries, str):
            catch_all.append((path, entries))
            continue
        for entry in entries:
            key = (entry["method"].upper(), path)
            assert key not in routes, f"router maps {key} twice"
            if entry["function"] == "not-found":
                continue
            routes[key] = entry["function"]
    return routes, catch_all


def contract_routes() -> set[tuple[str, str]]:
    """{(METHOD, normalised path)} from the `### METHOD /path` headings of API.md."""
    text = API_MD.read_text(encoding="utf-8")
    found = re.findall(r"^###\s+(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS)\s+(/\S*)", text, re.M)
    return {(method, normalise(path)) for method, path in found}


class RouteTablesAgree(unittest.TestCase):
    """(a) template.yaml, the Cargo.toml router and API.md describe the same routes."""

    @needs_contract
    def test_contract_is_readable(self):
        self.assertTrue(API_MD.is_file(), f"API contract not found at {API_MD} (set API_MD)")
        self.assertGreaterEqual(len(contract_routes()), 10)

    def test_template_has_no_duplicate_routes(self):
        routes, default = template_routes()
        keys = [(m, p) for m, p, _ in routes]
        self.assertEqual(len(keys), len(set(keys)), f"duplicate routes: {sorted(keys)}")
        self.assertEqual(len(default), 1, "exactly one function must take the $default route")

    @needs_contract
    def test_template_matches_contract(self):
        routes, _ = template_routes()
        ours = {(m, normalise(p)) for m, p, _ in routes}
        contract = contract_routes()
        self.assertEqual(
            ours, contract,
            f"\nonly in template.yaml: {sorted(ours - contract)}"
            f"\nonly in API.md: {sorted(contract - ours)}",
        )

    @needs_contract
    def test_router_matches_contract(self):
        routes, _ = router_table()
        ours = {(m, normalise(p)) for m, p in routes}
        contract = contract_routes()
        self.assertEqual(
            ours, contract,
            f"\nonly in Cargo.toml router: {sorted(ours - contract)}"
            f"\nonly in API.md: {sorted(contract - ours)}",
        )

    def test_template_matches_router_exactly(self):
        # Exact paths, not normalised: the handlers read path parameters by name.
        routes, _ = template_routes()
        ours = {(m, p): b for m, p, b in routes}
        router, _ = router_table()
        self.assertEqual(ours, router, "template.yaml and the Cargo.toml router disagree")

    def test_unmatched_requests_go_to_not_found(self):
        _, default = template_routes()
        self.assertEqual(default, ["not-found"])
        _, catch_all = router_table()
        self.assertEqual(sorted(catch_all), [("/", "not-found"), ("/{*path}", "not-found")],
                         "the router must send the root and every unknown path to not-found")

    def test_http_events_use_the_explicit_api(self):
        for logical_id, fn in functions().items():
            for name, event in fn.get("Properties", {}).get("Events", {}).items():
                if event.get("Type") == "HttpApi":
                    with self.subTest(function=logical_id, event=name):
                        self.assertTrue(is_ref(event["Properties"].get("ApiId"), "HttpApi"))


# ----------------------------------------------------------------------------- IAM


def policy_statements(doc: dict) -> list[tuple[str, dict]]:
    """Every IAM statement written in a template: (where, statement)."""
    found = []

    def add(where, document):
        statements = document.get("Statement", [])
        for s in statements if isinstance(statements, list) else [statements]:
            found.append((where, s))

    for logical_id, res in doc["Resources"].items():
        props = res.get("Properties", {})
        if res["Type"] in ("AWS::IAM::ManagedPolicy", "AWS::IAM::Policy"):
            add(logical_id, props["PolicyDocument"])
        elif res["Type"] == "AWS::KMS::Key":
            add(f"{logical_id}/KeyPolicy", props["KeyPolicy"])
        elif res["Type"] == "AWS::IAM::Role":
            for p in props.get("Policies", []):
                add(f"{logical_id}/{p.get('PolicyName')}", p["PolicyDocument"])
        elif res["Type"] == "AWS::Serverless::Function":
            for p in props.get("Policies", []) or []:
                if isinstance(p, dict) and "Statement" in p:
                    add(logical_id, p)
    return found


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


class IamIsLeastPrivilege(unittest.TestCase):
    """(b) No statement grants `*` or `service:*`.

    Resource "*" exception, by AWS design: SAM attaches AWSLambdaVPCAccessExecutionRole to VPC
    functions, whose ec2 network-interface actions cannot be scoped to a resource. That managed
    policy is not in the template; test_generated_roles_use_only_known_managed_policies pins it.
    """

    def test_no_wildcard_actions(self):
        for path in (TEMPLATE, INFRA_TEMPLATE):
            statements = policy_statements(load_yaml(path))
            self.assertTrue(statements, f"no IAM statements found in {path.name}")
            for where, statement in statements:
                with self.subTest(template=path.name, where=where):
                    self.assertNotIn("NotAction", statement, "NotAction allows everything else")
                    for action in as_list(statement.get("Action", [])):
                        self.assertIsInstance(action, str)
                        self.assertFalse(
                            action == "*" or action.endswith(":*"),
                            f"wildcard action {action!r}",
                        )

    def test_db_connect_is_scoped_to_one_db_user(self):
        for where, statement in policy_statements(template()):
            if "rds-db:connect" in as_list(statement.get("Action")):
                for resource in as_list(statement["Resource"]):
                    with self.subTest(where=where):
                        arn = resource["Fn::Sub"] if isinstance(resource, dict) else resource
                        self.assertRegex(arn, r":dbuser:\$\{DbResourceId\}/\$\{Db\w*User\}$")

    def test_function_policies_are_our_own(self):
        # No SAM policy templates or AWS managed policies that could hide wildcards.
        managed = set(resources(template(), "AWS::IAM::ManagedPolicy"))
        for logical_id, fn in functions().items():
            for p in fn.get("Properties", {}).get("Policies", []) or []:
                with self.subTest(function=logical_id):
                    self.assertTrue(
                        (is_ref(p) and p["Ref"] in managed) or (isinstance(p, dict) and "Statement" in p),
                        f"unexpected policy {p!r}",
                    )

    def test_each_function_gets_only_the_db_access_it_needs(self):
        for binary in EXPECTED_BINARIES:
            logical_id, fn = function_by_binary(binary)
            refs = {p["Ref"] for p in fn.get("Properties", {}).get("Policies", []) or [] if is_ref(p)}
            with self.subTest(binary=binary):
                if binary in NO_DATABASE or binary == SETUP_FUNCTION:
                    self.assertEqual(refs, set())
                elif binary == "migrate":
                    self.assertEqual(refs, {"DbMigrateConnectPolicy"})
                    env = fn["Properties"]["Environment"]["Variables"]
                    self.assertTrue(is_ref(env.get("DB_USER"), "DbMigrateUser"))
                else:
                    self.assertEqual(refs, {"DbConnectPolicy"})

    def test_generated_roles_use_only_known_managed_policies(self):
        allowed = {
            "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
            "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
            "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
        }
        own = set(resources(template(), "AWS::IAM::ManagedPolicy"))
        roles = resources(translated(), "AWS::IAM::Role")
        self.assertEqual(len(roles), len(EXPECTED_BINARIES))
        for logical_id, role in roles.items():
            for arn in role["Properties"].get("ManagedPolicyArns", []):
                with self.subTest(role=logical_id, policy=arn):
                    self.assertTrue(arn["Ref"] in own if is_ref(arn) else arn in allowed)
            for p in role["Properties"].get("Policies", []):
                for s in as_list(p["PolicyDocument"]["Statement"]):
                    for action in as_list(s.get("Action", [])):
                        self.assertFalse(action == "*" or action.endswith(":*"), logical_id)


# ----------------------------------------------------------------------------- translated template


@functools.cache
def translated() -> dict:
    """template.yaml as SAM turns it into plain CloudFormation, offline."""
    try:
        from samtranslator.translator.transform import transform
        from samtranslator.yaml_helper import yaml_parse
    except ImportError as e:  # pragma: no cover - only outside .venv
        raise unittest.SkipTest(f"aws-sam-translator not installed: {e}")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # the translator wants a region
    doc = yaml_parse(TEMPLATE.read_text(encoding="utf-8"))
    # `sam build` rewrites CodeUri to the build output; the translator wants an S3 URI.
    doc["Globals"]["Function"]["CodeUri"] = "s3://offline-check/code.zip"

    class NoManagedPolicies:
        def load(self):
            return {}

    return transform(doc, {}, NoManagedPolicies())


class TranslatedTemplate(unittest.TestCase):
    def test_every_route_becomes_an_api_route(self):
        apis = resources(translated(), "AWS::ApiGatewayV2::Api")
        self.assertEqual(len(apis), 1)
        paths = next(iter(apis.values()))["Properties"]["Body"]["paths"]
        routes, _ = template_routes()
        expected = {p for _, p, _ in routes} | {"/$default"}
        self.assertEqual(set(paths), expected)

    def test_cors_survives_translation(self):
        # SAM collapses CorsConfiguration to `AllowOrigins` alone when that is an intrinsic.
        api = next(iter(resources(translated(), "AWS::ApiGatewayV2::Api").values()))
        cors = api["Properties"]["Body"]["x-amazon-apigateway-cors"]
        self.assertTrue(is_ref(cors.get("allowOrigins"), "CorsAllowedOrigins"), cors)
        self.assertTrue({"Authorization", "Content-Type", "Idempotency-Key"} <= set(cors.get("allowHeaders", [])))
        self.assertTrue(cors.get("allowMethods"), cors)

    @needs_contract
    def test_cors_headers_survive_translation_as_the_contracts(self):
        api = next(iter(resources(translated(), "AWS::ApiGatewayV2::Api").values()))
        cors = api["Properties"]["Body"]["x-amazon-apigateway-cors"]
        self.assertEqual(sorted(cors.get("allowHeaders", [])), sorted(contract_cors()["allowHeaders"]))
        self.assertEqual(sorted(cors.get("exposeHeaders", [])), sorted(contract_cors()["exposeHeaders"]))


# ----------------------------------------------------------------------------- CORS and API


def http_api() -> dict:
    apis = resources(template(), "AWS::Serverless::HttpApi")
    assert len(apis) == 1, f"expected one HttpApi, got {sorted(apis)}"
    return next(iter(apis.values()))["Properties"]


def cors_settings() -> dict:
    """CORS settings with lower-camel keys, wherever the template declares them."""
    props = http_api()
    if "CorsConfiguration" in props:
        c = props["CorsConfiguration"]
        assert isinstance(c, dict), "CorsConfiguration: true means `*`"
        return {k[0].lower() + k[1:]: v for k, v in c.items()}
    return props.get("DefinitionBody", {}).get("x-amazon-apigateway-cors", {})


def contract_cors() -> dict[str, list[str]]:
    """API.md "## CORS": the request headers a preflight allows and the exposed response headers."""
    text = API_MD.read_text(encoding="utf-8")
    section = re.search(r"^## CORS\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "API.md has no CORS section"
    body = " ".join(section.group(1).split())
    allowed = re.search(r"request headers[^(]*\(([^)]*)\)", body)
    exposed = re.search(r"exposed response headers ((?:`[^`]+`(?:, | and )?)+)", body)
    assert allowed and exposed, body
    return {
        "allowHeaders": re.findall(r"`([^`]+)`", allowed.group(1)),
        "exposeHeaders": re.findall(r"`([^`]+)`", exposed.group(1)),
    }


class CorsNeverWildcard(unittest.TestCase):
    """(c) AllowOrigins is never `*`, and its parameter can neither default to nor accept `*`."""

    def test_origins(self):
        origins = cors_settings().get("allowOrigins")
        self.assertIsNotNone(origins, "CORS must name its origins")
        if isinstance(origins, list):
            self.assertNotIn("*", origins)
            return
        self.assertTrue(is_ref(origins), f"AllowOrigins must be a list or a parameter: {origins}")
        name = origins["Ref"]
        param = template()["Parameters"][name]
        self.assertEqual(param["Type"], "CommaDelimitedList")
        default = param.get("Default")
        if default is not None:
            self.assertNotIn("*", [o.strip() for o in str(default).split(",")])
        pattern = param.get("AllowedPattern")
        self.assertTrue(pattern, "the origins parameter needs an AllowedPattern")
        for bad in ("*", "https://*", "http://example.com", "null", "https://*.example.com"):
            self.assertIsNone(re.fullmatch(pattern, bad), f"AllowedPattern accepts {bad!r}")
        for good in ("https://app.example.com", "http://localhost:3000"):
            self.assertIsNotNone(re.fullmatch(pattern, good), f"AllowedPattern refuses {good!r}")
        # A Rules assertion refuses `*` too (AllowedPattern is easy to loosen by accident).
        rules = json.dumps(template().get("Rules", {}))
        self.assertIn(json.dumps({"Fn::Contains": [{"Ref": name}, "*"]}), rules)

    @needs_contract
    def test_headers_are_the_contracts(self):
        cors = cors_settings()
        self.assertEqual(sorted(cors.get("allowHeaders", [])), sorted(contract_cors()["allowHeaders"]))
        self.assertEqual(sorted(cors.get("exposeHeaders", [])), sorted(contract_cors()["exposeHeaders"]))

    def test_headers_and_methods(self):
        cors = cors_settings()
        self.assertTrue({"Authorization", "Content-Type", "Idempotency-Key"} <= set(cors.get("allowHeaders", [])))
        used = {m for m, _, _ in template_routes()[0]}
        self.assertEqual(set(cors.get("allowMethods", [])) - {"OPTIONS"}, used)
        self.assertFalse(cors.get("allowCredentials", False))

    def test_function_side_list_is_the_same_parameter(self):
        env = template()["Globals"]["Function"]["Environment"]["Variables"]
        self.assertEqual(env["CORS_ALLOWED_ORIGINS"], {"Fn::Join": [",", {"Ref": "CorsAllowedOrigins"}]})

    def test_throttling_comes_from_parameters(self):
        settings = http_api()["DefaultRouteSettings"]
        for key in ("ThrottlingBurstLimit", "ThrottlingRateLimit"):
            with self.subTest(key=key):
                self.assertTrue(is_ref(settings.get(key)))
                self.assertIn(settings[key]["Ref"], template()["Parameters"])

    def test_access_log_is_json_without_headers(self):
        logs = http_api()["AccessLogSettings"]
        self.assertEqual(logs["DestinationArn"], {"Fn::GetAtt": ["ApiAccessLogGroup", "Arn"]})
        fmt = logs["Format"]
        json.loads(fmt)  # one JSON object per request
        self.assertNotRegex(fmt.lower(), r"authorization|header|\$context\.authorizer|querystring")


# ----------------------------------------------------------------------------- functions


class FunctionsBuildFromTheWorkspace(unittest.TestCase):
    """(d) Each function is a cargo-lambda build of one binary of the `functions` crate."""

    def test_build_metadata(self):
        self.assertEqual(template()["Globals"]["Function"]["CodeUri"], ".")
        binaries = []
        for logical_id, fn in functions().items():
            with self.subTest(function=logical_id):
                self.assertEqual(fn.get("Metadata", {}).get("BuildMethod"), "rust-cargolambda")
                self.assertTrue(binary_of(fn))
                self.assertEqual(fn_property(fn, "Runtime"), "provided.al2023")
                self.assertEqual(fn_property(fn, "Handler"), "bootstrap")
                self.assertEqual(fn_property(fn, "Architectures"), [{"Ref": "Architecture"}])
                binaries.append(binary_of(fn))
        self.assertEqual(sorted(binaries), sorted(EXPECTED_BINARIES))

    def test_architecture_parameter(self):
        param = template()["Parameters"]["Architecture"]
        self.assertEqual(param["Default"], "arm64")
        self.assertEqual(sorted(param["AllowedValues"]), ["arm64", "x86_64"])

    def test_binaries_exist(self):
        # Fails until functions/src/bin/<name>.rs exist (written alongside this template).
        for fn in functions().values():
            binary = binary_of(fn)
            with self.subTest(binary=binary):
                self.assertTrue((BIN_DIR / f"{binary}.rs").is_file(), f"missing {BIN_DIR / binary}.rs")

    def test_jwt_secret_goes_where_the_binary_uses_tokens(self):
        # Each binary declares `Tokens::Used` (fails at init without JWT_SECRET) or
        # `Tokens::Unused` (starts without it); the template gives the secret to the first only.
        globals_env = template()["Globals"]["Function"]["Environment"]["Variables"]
        for binary in EXPECTED_BINARIES:
            _, fn = function_by_binary(binary)
            env = {**globals_env, **fn["Properties"].get("Environment", {}).get("Variables", {})}
            source = (BIN_DIR / f"{binary}.rs").read_text(encoding="utf-8")
            with self.subTest(binary=binary):
                self.assertEqual(env.get("JWT_SECRET", "") != "", "Tokens::Used" in source)

    def test_log_level_is_a_level(self):
        # A directive like `lambda_runtime=trace` would log raw events (passwords, tokens).
        param = template()["Parameters"]["LogLevel"]
        self.assertEqual(sorted(param["AllowedValues"]), ["debug", "error", "info", "trace", "warn"])
        self.assertIn(param["Default"], param["AllowedValues"])

    def test_router_functions_are_binaries(self):
        routes, catch_all = router_table()
        self.assertLessEqual(set(routes.values()) | {f for _, f in catch_all}, EXPECTED_BINARIES)

    def test_memory_sizing(self):
        self.assertEqual(template()["Globals"]["Function"]["MemorySize"], 256)
        for binary in EXPECTED_BINARIES:
            _, fn = function_by_binary(binary)
            with self.subTest(binary=binary):
                expected = 1769 if binary in BCRYPT_FUNCTIONS else 256
                self.assertEqual(fn_property(fn, "MemorySize"), expected)

    def test_globals(self):
        g = template()["Globals"]["Function"]
        self.assertEqual(g["Tracing"], "Active")
        self.assertEqual(g["LoggingConfig"]["LogFormat"], "JSON")
        self.assertTrue(is_ref(g["VpcConfig"]["SubnetIds"], "SubnetIds"))
        self.assertTrue(is_ref(g["VpcConfig"]["SecurityGroupIds"], "SecurityGroupIds"))
        self.assertEqual(template()["Parameters"]["SubnetIds"]["Type"], "List<AWS::EC2::Subnet::Id>")
        env = g["Environment"]["Variables"]
        self.assertEqual(env["DB_IAM_AUTH"], "true")
        self.assertEqual(env["DB_STATEMENT_CACHE_CAPACITY"], "0")  # RDS Proxy: no pinning
        for var, param in (("DB_HOST", "DbHost"), ("DB_PORT", "DbPort"), ("DB_NAME", "DbName"),
                           ("DB_USER", "DbUser")):
            self.assertTrue(is_ref(env[var], param), var)

    @needs_contract
    def test_environment_names_are_ones_the_config_reads(self):
        table = re.findall(r"^\|\s*`([A-Z0-9_]+)`\s*\|", API_MD.read_text(encoding="utf-8"), re.M)
        known = set(table) | CONFIG_EXTENSIONS
        self.assertIn("JWT_SECRET", known)
        envs = [("Globals", template()["Globals"]["Function"]["Environment"]["Variables"])]
        envs += [(k, f["Properties"].get("Environment", {}).get("Variables", {})) for k, f in functions().items()]
        for where, variables in envs:
            with self.subTest(where=where):
                self.assertLessEqual(set(variables), known, "unknown (misspelt?) variable")


class BackgroundFunctions(unittest.TestCase):
    """(e) purge runs hourly; purge and migrate get 300 s."""

    def test_purge_is_hourly(self):
        _, fn = function_by_binary("purge")
        schedules = []
        for event in fn["Properties"].get("Events", {}).values():
            props = event.get("Properties", {})
            if event["Type"] == "Schedule":
                schedules.append((props.get("Schedule"), props.get("Enabled", True)))
            elif event["Type"] == "ScheduleV2":
                schedules.append((props.get("ScheduleExpression"), props.get("State", "ENABLED") == "ENABLED"))
        self.assertEqual(len(schedules), 1, schedules)
        expression, enabled = schedules[0]
        self.assertIn(expression, ("rate(1 hour)", "rate(60 minutes)", "cron(0 * * * ? *)"))
        self.assertIs(enabled, True)

    def test_timeouts(self):
        for binary in ("purge", "migrate"):
            _, fn = function_by_binary(binary)
            with self.subTest(binary=binary):
                self.assertEqual(fn_property(fn, "Timeout"), 300)

    def test_migrate_is_not_exposed(self):
        _, fn = function_by_binary("migrate")
        self.assertFalse(fn["Properties"].get("Events"), "migrate is invoked by hand only")


# ----------------------------------------------------------------------------- secrets


class SecretsAreReferences(unittest.TestCase):
    """(f) Secret/token parameters have no default; the values arrive as dynamic references."""

    def test_secret_parameters_have_no_default(self):
        for path in (TEMPLATE, INFRA_TEMPLATE):
            for name, param in load_yaml(path).get("Parameters", {}).items():
                if re.search(r"secret|token|password", name, re.I):
                    with self.subTest(template=path.name, parameter=name):
                        self.assertNotIn("Default", param)

    def test_secret_variables_are_dynamic_references(self):
        envs = [("Globals", template()["Globals"]["Function"]["Environment"]["Variables"])]
        envs += [(k, f["Properties"].get("Environment", {}).get("Variables", {})) for k, f in functions().items()]
        self.assertIn("JWT_SECRET", envs[0][1])
        # METRICS_TOKEN goes to `metrics` alone (test_translated checks every function).
        _, metrics = function_by_binary("metrics")
        self.assertIn("METRICS_TOKEN", metrics["Properties"]["Environment"]["Variables"])
        self.assertNotIn("METRICS_TOKEN", envs[0][1])
        for where, variables in envs:
            for var in ("JWT_SECRET", "METRICS_TOKEN"):
                if var not in variables:
                    continue
                with self.subTest(where=where, variable=var):
                    value = variables[var]
                    if where != "Globals" and value == "":
                        continue  # blanked for a function that does not need it (migrate)
                    text = value.get("Fn::Sub") if isinstance(value, dict) else value
                    self.assertIsInstance(text, str, f"{var} must be a dynamic reference")
                    self.assertRegex(text, DYNAMIC_SECRET_REF)
                    for param in re.findall(r"\$\{(\w+)\}", text):
                        self.assertRegex(param, r"Secret|Token")
                        self.assertNotIn("Default", template()["Parameters"][param])

    def test_no_secret_value_in_the_example_config(self):
        with SAMCONFIG_EXAMPLE.open("rb") as f:
            config = tomllib.load(f)
        overrides = config["default"]["deploy"]["parameters"]["parameter_overrides"]
        params = template()["Parameters"]
        for item in overrides:
            key, _, value = item.partition("=")
            with self.subTest(parameter=key):
                self.assertIn(key, params)
                if re.search(r"secret|token", key, re.I):
                    if key == "JwtPreviousSecretStage":
                        # A rotation sets it for its duration; deployed, there is none.
                        self.assertEqual(value, "none")
                        continue
                    if key.endswith("Stage"):
                        # The staging label the first deploy pins (rotations set their own
                        # labels on the stack, never here): a label, not a value.
                        self.assertEqual(value, "AWSCURRENT", "only AWSCURRENT belongs here")
                        continue
                    self.assertTrue(value.startswith("arn:"), "only the secret's ARN belongs here")


# ----------------------------------------------------------------------------- infra stack


class InfraStackFeedsTheApp(unittest.TestCase):
    def test_outputs_cover_required_parameters(self):
        infra_outputs = set(load_yaml(INFRA_TEMPLATE)["Outputs"])
        for name, param in template()["Parameters"].items():
            if "Default" not in param and name != "CorsAllowedOrigins":
                with self.subTest(parameter=name):
                    self.assertIn(name, infra_outputs)

    def test_database_and_proxy_security(self):
        infra = load_yaml(INFRA_TEMPLATE)
        (db,) = resources(infra, "AWS::RDS::DBInstance").values()
        p = db["Properties"]
        self.assertIs(p["EnableIAMDatabaseAuthentication"], True)
        self.assertIs(p["ManageMasterUserPassword"], True)
        self.assertNotIn("MasterUserPassword", p)
        self.assertIs(p["StorageEncrypted"], True)
        self.assertIs(p["PubliclyAccessible"], False)
        (proxy,) = resources(infra, "AWS::RDS::DBProxy").values()
        self.assertIs(proxy["Properties"]["RequireTLS"], True)
        self.assertEqual(proxy["Properties"]["DefaultAuthScheme"], "IAM_AUTH")
        for auth in proxy["Properties"].get("Auth", []):
            self.assertEqual(auth.get("IAMAuth"), "REQUIRED")

    def test_generated_secrets(self):
        secrets = resources(load_yaml(INFRA_TEMPLATE), "AWS::SecretsManager::Secret")
        self.assertEqual(len(secrets), 2)
        for name, secret in secrets.items():
            with self.subTest(secret=name):
                self.assertNotIn("SecretString", secret["Properties"])
                self.assertGreaterEqual(secret["Properties"]["GenerateSecretString"]["PasswordLength"], 48)

    def test_db_role_names_agree(self):
        sql = CREATE_DB_USER_SQL.read_text(encoding="utf-8")
        infra = load_yaml(INFRA_TEMPLATE)["Parameters"]
        app = template()["Parameters"]
        for ours, theirs in (("DbUser", "AppDbUser"), ("DbMigrateUser", "MigrateDbUser")):
            with self.subTest(parameter=ours):
                role = app[ours]["Default"]
                self.assertEqual(infra[theirs]["Default"], role)
                self.assertRegex(sql, rf"CREATE ROLE {role} LOGIN")
                self.assertRegex(sql, rf"GRANT rds_iam TO [\w, ]*\b{role}\b")


class RustRouteTableAgrees(unittest.TestCase):
    """functions/src/routes.rs (the `routes!` table that `dispatch` and not-found's 404/405 come
    from) is the source of the router: it must equal the router's."""

    def test_routes_rs_matches_router(self):
        sys.path.insert(0, str(REPO / "scripts"))
        from routes import table

        rust = {(m, p): f for m, p, f, _ in table()}
        router, _ = router_table()
        self.assertEqual(rust, router, "functions/src/routes.rs and the Cargo.toml router disagree")


if __name__ == "__main__":
    unittest.main()
