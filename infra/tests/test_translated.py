"""Issue 15: the CloudFormation that SAM makes of template.yaml (aws-sam-translator, offline),
tested as API Gateway, Lambda, IAM and EventBridge will receive it: every route's integration,
each function's environment, the IAM roles and statements, the CORS configuration, the stage and
the schedule. Also the operator's path: secrets that really rotate, a first deploy safe to retry,
the one-time role setup, and the commands and README that go with them.

Run: .venv/bin/python -m unittest discover -s infra/tests -v   (infra/check.sh does).
"""

from __future__ import annotations

import re
import unittest

from test_template import (
    API_MD,
    EXPECTED_BINARIES,
    INFRA_TEMPLATE,
    REPO,
    SETUP_FUNCTION,
    as_list,
    binary_of,
    contract_cors,
    function_by_binary,
    is_ref,
    load_yaml,
    needs_contract,
    normalise,
    resources,
    template,
    template_routes,
    translated,
    without_contract_checks as load_tests,
)

# The managed policies SAM attaches to every role here, each granting on Resource "*" (see
# infra/README.md "IAM"): logs, X-Ray (Tracing: Active), ENIs (VpcConfig).
SAM_MANAGED = [
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
    "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
]
# Functions that neither issue nor verify tokens: no JWT_SECRET.
NO_JWT = {"register", "link-device", "health", "metrics", "not-found", "purge", "migrate", SETUP_FUNCTION}
README = REPO / "infra" / "README.md"
MAKEFILE = REPO / "Makefile"
SCRIPTS = REPO / "scripts"


def cfn() -> dict:
    return translated()


def cfn_functions() -> dict[str, dict]:
    """binary -> translated AWS::Lambda::Function properties."""
    out = {}
    for logical_id, res in resources(cfn(), "AWS::Lambda::Function").items():
        out[binary_of(res)] = res["Properties"]
    return out


def binary_of_logical_id(logical_id: str) -> str:
    return binary_of(template()["Resources"][logical_id])


def http_api_body() -> dict:
    (api,) = resources(cfn(), "AWS::ApiGatewayV2::Api").values()
    return api["Properties"]["Body"]


def integration_target(operation: dict) -> str:
    """The function logical id an OpenAPI operation's Lambda proxy integration invokes."""
    integration = operation["x-amazon-apigateway-integration"]
    assert integration["type"] == "aws_proxy", integration
    assert integration["httpMethod"] == "POST", integration  # Lambda is always invoked by POST
    assert integration["payloadFormatVersion"] == "2.0", integration  # lambda_http's apigw_http
    uri = integration["uri"]["Fn::Sub"]
    m = re.fullmatch(
        r"arn:\$\{AWS::Partition\}:apigateway:\$\{AWS::Region\}:lambda:path/2015-03-31/functions/"
        r"\$\{(\w+)\.Arn\}/invocations",
        uri,
    )
    assert m, uri
    return m.group(1)


def contract_auth_routes() -> set[tuple[str, str]]:
    """{(METHOD, normalised path)} of API.md headings marked (auth)."""
    text = API_MD.read_text(encoding="utf-8")
    found = re.findall(r"^###\s+([A-Z]+)\s+(/\S*)\s+\(auth\)", text, re.M)
    return {(m, normalise(p)) for m, p in found}


def secret_reference(value) -> str | None:
    """The Fn::Sub text of a dynamic reference, or None for a blank/absent value."""
    if value in (None, ""):
        return None
    assert isinstance(value, dict) and set(value) == {"Fn::Sub"}, value
    return value["Fn::Sub"]


def previous_secret_reference(value) -> str | None:
    """The Fn::Sub text of JWT_PREVIOUS_SECRET's reference, taken only while a rotation names a
    previous stage (Fn::If on HasPreviousJwtSecret, blank otherwise), or None when blank."""
    if value in (None, ""):
        return None
    assert isinstance(value, dict) and set(value) == {"Fn::If"}, value
    condition, when_set, otherwise = value["Fn::If"]
    assert condition == "HasPreviousJwtSecret" and otherwise == "", value
    return secret_reference(when_set)


class RoutesInTheTranslatedApi(unittest.TestCase):
    def test_every_route_key_invokes_its_function(self):
        paths = http_api_body()["paths"]
        routes, _ = template_routes()
        expected = {(m.lower(), p): b for m, p, b in routes}
        got = {}
        for path, operations in paths.items():
            for method, operation in operations.items():
                if method == "x-amazon-apigateway-any-method":
                    method = "any"
                target = binary_of_logical_id(integration_target(operation))
                got[(method, path)] = target
        default = got.pop(("any", "/$default"), None)
        self.assertEqual(default, "not-found", "$default must invoke not-found")
        self.assertEqual(got, expected)
        self.assertTrue(paths["/$default"]["x-amazon-apigateway-any-method"].get("isDefaultRoute"))

    def test_each_route_may_invoke_only_its_function(self):
        # One Lambda permission per route, scoped to this API and to that route's method and path.
        routes, _ = template_routes()
        expected = {(b, m, p) for m, p, b in routes} | {("not-found", "*", "$default")}
        got = set()
        for logical_id, perm in resources(cfn(), "AWS::Lambda::Permission").items():
            props = perm["Properties"]
            if props["Principal"] != "apigateway.amazonaws.com":
                continue
            with self.subTest(permission=logical_id):
                self.assertEqual(props["Action"], "lambda:InvokeFunction")
                text, values = props["SourceArn"]["Fn::Sub"]
                self.assertTrue(is_ref(values["__ApiId__"], "HttpApi"))
                if text.endswith("/${__Stage__}/*"):  # $default: any method, any path
                    text = text[:-1] + "*/$default"
                m = re.fullmatch(
                    r"arn:\$\{AWS::Partition\}:execute-api:\$\{AWS::Region\}:\$\{AWS::AccountId\}:"
                    r"\$\{__ApiId__\}/\$\{__Stage__\}/([A-Z*]+)(/.*)",
                    text,
                )
                self.assertTrue(m, text)
                method, path = m.group(1), m.group(2)
                path = "$default" if path == "/$default" else path
                got.add((binary_of_logical_id(props["FunctionName"]["Ref"]), method, path))
        # SAM writes path parameters as `*` in the source ARN.
        expected = {(b, m, re.sub(r"\{[^}]+\}", "*", p)) for b, m, p in expected}
        self.assertEqual(got, expected)

    def test_nothing_else_invokes_the_functions(self):
        by_principal = {}
        for perm in resources(cfn(), "AWS::Lambda::Permission").values():
            props = perm["Properties"]
            by_principal.setdefault(props["Principal"], set()).add(
                binary_of_logical_id(props["FunctionName"]["Ref"]))
        self.assertEqual(set(by_principal), {"apigateway.amazonaws.com", "events.amazonaws.com"})
        self.assertEqual(by_principal["events.amazonaws.com"], {"purge"})
        for binary in ("purge", "migrate", SETUP_FUNCTION):
            self.assertNotIn(binary, by_principal["apigateway.amazonaws.com"])

    def test_stage(self):
        stages = resources(cfn(), "AWS::ApiGatewayV2::Stage")
        self.assertEqual(len(stages), 1)
        (stage,) = stages.values()
        p = stage["Properties"]
        self.assertEqual(p["StageName"], "$default")
        self.assertIs(p["AutoDeploy"], True)
        self.assertEqual(p["DefaultRouteSettings"], {
            "ThrottlingBurstLimit": {"Ref": "ApiThrottlingBurstLimit"},
            "ThrottlingRateLimit": {"Ref": "ApiThrottlingRateLimit"},
        })
        self.assertEqual(p["AccessLogSettings"]["DestinationArn"], {"Fn::GetAtt": ["ApiAccessLogGroup", "Arn"]})
        self.assertIs(http_api_body().get("x-amazon-apigateway-importexport-version", None), None)


class CorsAsApiGatewayApplies(unittest.TestCase):
    """API.md "CORS", in the configuration API Gateway receives (it answers preflights itself
    and ignores CORS headers from the functions)."""

    def cors(self) -> dict:
        return http_api_body()["x-amazon-apigateway-cors"]

    @needs_contract
    def test_allow_headers_are_the_contracts(self):
        self.assertEqual(sorted(self.cors()["allowHeaders"]), sorted(contract_cors()["allowHeaders"]))

    def test_allow_headers_include_the_clients(self):
        allowed = self.cors()["allowHeaders"]
        for name in ("Authorization", "Content-Type", "Idempotency-Key"):
            self.assertIn(name, allowed)

    @needs_contract
    def test_expose_headers_are_the_contracts(self):
        self.assertEqual(sorted(self.cors()["exposeHeaders"]), sorted(contract_cors()["exposeHeaders"]))

    def test_expose_headers_include_the_clients(self):
        exposed = self.cors()["exposeHeaders"]
        for name in ("Retry-After", "WWW-Authenticate", "Idempotent-Replayed"):
            self.assertIn(name, exposed)

    def test_allow_methods_are_the_routes(self):
        routes, _ = template_routes()
        self.assertEqual(set(self.cors()["allowMethods"]) - {"OPTIONS"}, {m for m, _, _ in routes})

    def test_origins_credentials_max_age(self):
        cors = self.cors()
        self.assertTrue(is_ref(cors["allowOrigins"], "CorsAllowedOrigins"))
        self.assertIs(cors["allowCredentials"], False)
        self.assertTrue(0 < cors["maxAge"] <= 86400)


class FunctionEnvironments(unittest.TestCase):
    """Each translated function holds only the secrets it needs."""

    def test_every_function_is_translated(self):
        self.assertEqual(set(cfn_functions()), EXPECTED_BINARIES)

    @needs_contract
    def test_jwt_secret_only_where_tokens_are_issued_or_verified(self):
        routes, _ = template_routes()
        binary = {(m, normalise(p)): b for m, p, b in routes}
        auth = contract_auth_routes()
        self.assertTrue(auth, "API.md marks no route (auth)")
        # (A contract route the template lacks fails the route-table tests instead.)
        needs = {binary[r] for r in auth if r in binary} | {"login"}
        self.assertFalse(needs & NO_JWT, "a function that verifies tokens is in NO_JWT")
        for name, props in cfn_functions().items():
            env = props["Environment"]["Variables"]
            ref = secret_reference(env.get("JWT_SECRET"))
            previous = previous_secret_reference(env.get("JWT_PREVIOUS_SECRET"))
            with self.subTest(function=name):
                if name in needs:
                    self.assertEqual(
                        ref, "{{resolve:secretsmanager:${JwtSecretArn}:SecretString::${JwtSecretStage}}}")
                    self.assertEqual(
                        previous,
                        "{{resolve:secretsmanager:${JwtSecretArn}:SecretString::${JwtPreviousSecretStage}}}")
                else:
                    self.assertIsNone(ref, f"{name} must not get JWT_SECRET")
                    self.assertIsNone(previous, f"{name} must not get JWT_PREVIOUS_SECRET")
                    self.assertIn(name, NO_JWT)

    def test_metrics_token_only_in_metrics(self):
        for name, props in cfn_functions().items():
            ref = secret_reference(props["Environment"]["Variables"].get("METRICS_TOKEN"))
            with self.subTest(function=name):
                if name == "metrics":
                    self.assertEqual(
                        ref,
                        "{{resolve:secretsmanager:${MetricsTokenSecretArn}:SecretString::${MetricsTokenSecretStage}}}",
                    )
                else:
                    self.assertIsNone(ref)

    def test_no_other_secret_reaches_a_function(self):
        for name, props in cfn_functions().items():
            for var, value in props["Environment"]["Variables"].items():
                if var in ("JWT_SECRET", "JWT_PREVIOUS_SECRET", "METRICS_TOKEN"):
                    continue  # each checked where it may go, above
                with self.subTest(function=name, variable=var):
                    self.assertNotIn("resolve:", repr(value))

    def test_database_settings(self):
        for name, props in cfn_functions().items():
            env = props["Environment"]["Variables"]
            with self.subTest(function=name):
                self.assertEqual(env["DB_IAM_AUTH"], "true")
                self.assertEqual(env["DB_STATEMENT_CACHE_CAPACITY"], "0")
                self.assertTrue(is_ref(env["DB_HOST"], "DbHost"))
                expected_user = "DbMigrateUser" if name == "migrate" else "DbUser"
                self.assertTrue(is_ref(env["DB_USER"], expected_user))


class IamOfTheTranslatedRoles(unittest.TestCase):
    def role_of(self, binary: str) -> dict:
        props = cfn_functions()[binary]
        role_id = props["Role"]["Fn::GetAtt"][0]
        return cfn()["Resources"][role_id]["Properties"]

    def test_every_role_is_lambdas_alone(self):
        for binary in EXPECTED_BINARIES:
            doc = self.role_of(binary)["AssumeRolePolicyDocument"]
            with self.subTest(function=binary):
                (statement,) = doc["Statement"]
                self.assertEqual(statement["Effect"], "Allow")
                self.assertEqual(as_list(statement["Action"]), ["sts:AssumeRole"])
                self.assertEqual(statement["Principal"], {"Service": ["lambda.amazonaws.com"]})
                self.assertNotIn("Condition", statement)

    def test_exact_policies_per_function(self):
        db = {"migrate": [{"Ref": "DbMigrateConnectPolicy"}], "not-found": [], SETUP_FUNCTION: []}
        for binary in EXPECTED_BINARIES:
            role = self.role_of(binary)
            with self.subTest(function=binary):
                self.assertEqual(role["ManagedPolicyArns"], SAM_MANAGED + db.get(binary, [{"Ref": "DbConnectPolicy"}]))
                self.assertNotIn("Policies", role, "no inline policies")
                self.assertNotIn("PermissionsBoundary", role)

    def test_own_policies_grant_one_connect_each(self):
        policies = resources(cfn(), "AWS::IAM::ManagedPolicy")
        self.assertEqual(set(policies), {"DbConnectPolicy", "DbMigrateConnectPolicy"})
        users = {"DbConnectPolicy": "DbUser", "DbMigrateConnectPolicy": "DbMigrateUser"}
        for name, policy in policies.items():
            with self.subTest(policy=name):
                (statement,) = policy["Properties"]["PolicyDocument"]["Statement"]
                self.assertEqual(statement["Effect"], "Allow")
                self.assertEqual(statement["Action"], "rds-db:connect")
                self.assertEqual(statement["Resource"], {"Fn::Sub": (
                    "arn:${AWS::Partition}:rds-db:${AWS::Region}:${AWS::AccountId}:dbuser:"
                    f"${{DbResourceId}}/${{{users[name]}}}")})

    def test_readme_names_every_managed_policy_granting_on_star(self):
        text = README.read_text(encoding="utf-8")
        iam = re.search(r"^- \*\*IAM\.\*\*(.*?)(?=^- \*\*)", text, re.M | re.S)
        self.assertTrue(iam, "infra/README.md lost its IAM paragraph")
        for arn in SAM_MANAGED:
            with self.subTest(policy=arn):
                self.assertIn(arn.rsplit("/", 1)[1], iam.group(1))


class PurgeSchedule(unittest.TestCase):
    def test_one_hourly_rule_targets_purge(self):
        rules = resources(cfn(), "AWS::Events::Rule")
        self.assertEqual(len(rules), 1, rules)
        (logical_id, rule), = rules.items()
        p = rule["Properties"]
        self.assertEqual(p["ScheduleExpression"], "rate(1 hour)")
        self.assertEqual(p["State"], "ENABLED")
        (target,) = p["Targets"]
        self.assertEqual(target["Arn"], {"Fn::GetAtt": [function_by_binary("purge")[0], "Arn"]})
        self.assertNotIn("Input", target, "purge deserialises the EventBridge envelope itself")
        perms = [perm["Properties"] for perm in resources(cfn(), "AWS::Lambda::Permission").values()
                 if perm["Properties"]["Principal"] == "events.amazonaws.com"]
        self.assertEqual(perms, [{
            "Action": "lambda:InvokeFunction",
            "FunctionName": {"Ref": function_by_binary("purge")[0]},
            "Principal": "events.amazonaws.com",
            "SourceArn": {"Fn::GetAtt": [logical_id, "Arn"]},
        }])
        self.assertFalse(resources(cfn(), "AWS::Scheduler::Schedule"))


# ----------------------------------------------------------------------------- operator's path


class SecretsReallyRotate(unittest.TestCase):
    """A rotation must change the dynamic reference itself, or CloudFormation keeps the old value."""

    def test_references_include_a_staging_label_parameter(self):
        for name, stage in (("JwtSecretArn", "JwtSecretStage"), ("MetricsTokenSecretArn", "MetricsTokenSecretStage")):
            with self.subTest(parameter=stage):
                param = template()["Parameters"][stage]
                self.assertNotIn("Default", param)
                self.assertIsNone(re.fullmatch(param["AllowedPattern"], "a:b"), "a colon ends the segment")
                for good in ("AWSCURRENT", "rotated-20261130T120000Z"):
                    self.assertIsNotNone(re.fullmatch(param["AllowedPattern"], good))
                refs = [v for props in cfn_functions().values()
                        for v in props["Environment"]["Variables"].values()
                        if isinstance(v, dict) and f"${{{name}}}" in v.get("Fn::Sub", "")]
                self.assertTrue(refs)
                for ref in refs:
                    self.assertTrue(ref["Fn::Sub"].endswith(f":SecretString::${{{stage}}}}}}}"), ref)

    def test_the_infra_stack_starts_at_awscurrent(self):
        outputs = load_yaml(INFRA_TEMPLATE)["Outputs"]
        self.assertEqual(outputs["JwtSecretStage"]["Value"], "AWSCURRENT")
        self.assertEqual(outputs["MetricsTokenSecretStage"]["Value"], "AWSCURRENT")

    def test_rotation_commands(self):
        makefile = MAKEFILE.read_text(encoding="utf-8")
        self.assertRegex(makefile, r"(?m)^rotate-jwt-secret:\n\t.*rotate-secret\.sh jwt$")
        self.assertRegex(makefile, r"(?m)^rotate-metrics-token:\n\t.*rotate-secret\.sh metrics$")
        script = (SCRIPTS / "rotate-secret.sh").read_text(encoding="utf-8")
        for needle in ("put-secret-value", "AWSCURRENT", "update-stack", "--use-previous-template",
                       "UsePreviousValue", "JwtSecretStage", "MetricsTokenSecretStage",
                       "stack-update-complete", "CAPABILITY_AUTO_EXPAND"):
            self.assertIn(needle, script)
        self.assertNotRegex(script, r"--secret-string", "the new value must not be on a command line")
        readme = README.read_text(encoding="utf-8")
        self.assertIn("make rotate-jwt-secret", readme)
        self.assertRegex(readme, r"live tokens|tokens signed with the old key")


class FirstDeploySafeToRetry(unittest.TestCase):
    def test_deletion_protection_off_by_default_and_on_after_create(self):
        param = load_yaml(INFRA_TEMPLATE)["Parameters"]["DbDeletionProtection"]
        self.assertEqual(param["Default"], "false", "a failed first create must be able to roll back")
        (db,) = resources(load_yaml(INFRA_TEMPLATE), "AWS::RDS::DBInstance").values()
        self.assertTrue(is_ref(db["Properties"]["DeletionProtection"], "DbDeletionProtection"))
        self.assertEqual(db["DeletionPolicy"], "Snapshot")
        script = (SCRIPTS / "deploy-infra.sh").read_text(encoding="utf-8")
        self.assertIn("deploy false", script)
        self.assertIn("deploy true", script)
        self.assertIn("ROLLBACK_COMPLETE", script)
        self.assertRegex(MAKEFILE.read_text(encoding="utf-8"), r"(?m)^deploy-infra:\n\t.*deploy-infra\.sh$")

    def test_no_fixed_names_that_a_retry_would_collide_with(self):
        # Generated names only, except the proxy's (deleted with the failed stack).
        infra = load_yaml(INFRA_TEMPLATE)["Resources"]
        for logical_id, res in infra.items():
            props = res.get("Properties", {})
            for key in ("Name", "DBInstanceIdentifier", "GroupName", "RoleName"):
                with self.subTest(resource=logical_id, key=key):
                    self.assertNotIn(key, props)


class RoleSetupWorksInThisNetwork(unittest.TestCase):
    """Step 2 needs nothing the VPC lacks: no NAT, no endpoint, no host inside the VPC."""

    def test_setup_function(self):
        logical_id, fn = function_by_binary(SETUP_FUNCTION)
        props = cfn_functions()[SETUP_FUNCTION]
        self.assertFalse(template()["Resources"][logical_id]["Properties"].get("Events"),
                         "invoked by hand only")
        self.assertEqual(props["VpcConfig"]["SecurityGroupIds"], [{"Ref": "AdminSecurityGroupId"}])
        self.assertTrue(is_ref(props["VpcConfig"]["SubnetIds"], "SubnetIds"))
        self.assertLessEqual(props["Timeout"], 300)
        self.assertIn("SetupRolesFunctionName", template()["Outputs"])
        src = (REPO / "functions" / "src" / "setup_roles.rs").read_text(encoding="utf-8")
        self.assertIn('include_str!("../../infra/create-db-user.sql")', src)
        self.assertIn("PgSslMode::VerifyFull", src)

    def test_admin_group_reaches_the_instance_and_nothing_else(self):
        infra = load_yaml(INFRA_TEMPLATE)
        res = infra["Resources"]
        egress = res["AdminSecurityGroup"]["Properties"]["SecurityGroupEgress"]
        self.assertEqual([e["CidrIp"] for e in egress], ["127.0.0.1/32"], "no default allow-all egress")
        rules = [r["Properties"] for r in res.values() if r["Type"] == "AWS::EC2::SecurityGroupEgress"
                 and is_ref(r["Properties"]["GroupId"], "AdminSecurityGroup")]
        self.assertEqual(len(rules), 1)
        self.assertEqual((rules[0]["FromPort"], rules[0]["ToPort"], rules[0]["IpProtocol"]), (5432, 5432, "tcp"))
        self.assertTrue(is_ref(rules[0]["DestinationSecurityGroupId"], "DbSecurityGroup"))
        ingress = [r["Properties"] for r in res.values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"
                   and is_ref(r["Properties"].get("SourceSecurityGroupId"), "AdminSecurityGroup")]
        self.assertEqual(len(ingress), 1)
        self.assertTrue(is_ref(ingress[0]["GroupId"], "DbSecurityGroup"))
        self.assertEqual(infra["Outputs"]["AdminSecurityGroupId"]["Value"], {"Ref": "AdminSecurityGroup"})
        # Still no way out of the VPC: no gateway, NAT or endpoint is needed for the setup.
        for kind in ("AWS::EC2::InternetGateway", "AWS::EC2::NatGateway", "AWS::EC2::VPCEndpoint"):
            self.assertFalse([r for r in res.values() if r["Type"] == kind], kind)

    def test_command_and_readme(self):
        self.assertRegex(MAKEFILE.read_text(encoding="utf-8"), r"(?m)^setup-roles:\n\t.*setup-roles\.sh$")
        script = (SCRIPTS / "setup-roles.sh").read_text(encoding="utf-8")
        for needle in ("DbMasterUserSecretArn", "DbInstanceEndpoint", "SetupRolesFunctionName",
                       "truststore.pki.rds.amazonaws.com", "fileb://"):
            self.assertIn(needle, script)
        readme = README.read_text(encoding="utf-8")
        step2 = re.search(r"^### \d\. Create the database roles.*?(?=^### )", readme, re.M | re.S).group(0)
        self.assertIn("make setup-roles", step2)
        for impossible in ("CloudShell VPC environment", "Session Manager", "psql \"host"):
            self.assertNotIn(impossible, step2)


class CapacityAndOverload(unittest.TestCase):
    def test_proxy_gives_up_within_two_seconds(self):
        (tg,) = resources(load_yaml(INFRA_TEMPLATE), "AWS::RDS::DBProxyTargetGroup").values()
        self.assertLessEqual(tg["Properties"]["ConnectionPoolConfigurationInfo"]["ConnectionBorrowTimeout"], 2)


class SmokeTest(unittest.TestCase):
    def test_make_smoke(self):
        self.assertRegex(MAKEFILE.read_text(encoding="utf-8"), r"(?m)^smoke:\n\t.*API=\"\$\(API\)\" bash scripts/smoke\.sh$")
        script = (SCRIPTS / "smoke.sh").read_text(encoding="utf-8")
        for needle in ("Access-Control-Allow-Methods", "Access-Control-Allow-Headers", "Idempotency-Key",
                       "OPTIONS", "/health/ready", "/messages", "delivered"):
            self.assertIn(needle, script)


if __name__ == "__main__":
    unittest.main()
