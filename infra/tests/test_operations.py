"""The database roles' timeouts against the
functions' timeouts, the stage throttle derived from the instance class's connections, the
alarms an operator gets, and the customer-managed key of the functions' environments. On the
SAM source, on the infra stack and on the CloudFormation SAM makes of template.yaml.

Run: .venv/bin/python -m unittest discover -s infra/tests -v   (infra/check.sh does).
"""

from __future__ import annotations

import math
import re
import unittest

from test_template import (
    CREATE_DB_USER_SQL,
    EXPECTED_BINARIES,
    INFRA_TEMPLATE,
    REPO,
    SETUP_FUNCTION,
    as_list,
    binary_of,
    fn_property,
    function_by_binary,
    functions,
    is_ref,
    load_yaml,
    resources,
    template,
    translated,
)

README = REPO / "infra" / "README.md"
CONFIG_RS = REPO / "common" / "src" / "config.rs"
PURGE_RS = REPO / "functions" / "src" / "purge.rs"
ALARM = "AWS::CloudWatch::Alarm"
# Invoked by hand by the operator, who sees the result: no alarm needed (infra/README.md "Alarms").
OPERATOR_FUNCTIONS = {"migrate", SETUP_FUNCTION}
UNIT_MS = {"ms": 1, "s": 1000, "min": 60_000}


def infra() -> dict:
    return load_yaml(INFRA_TEMPLATE)


# ----------------------------------------------------------------------------- timeouts


def role_settings() -> dict[str, dict[str, int]]:
    """{role: {setting: milliseconds}} from the ALTER ROLE ... SET lines of create-db-user.sql."""
    sql = CREATE_DB_USER_SQL.read_text(encoding="utf-8")
    out: dict[str, dict[str, int]] = {}
    for role, name, value, unit in re.findall(
        r"^ALTER ROLE (\w+) SET (\w+) = '(\d+)(ms|s|min)';$", sql, re.M
    ):
        out.setdefault(role, {})[name] = int(value) * UNIT_MS[unit]
    return out


def acquire_timeout_ms(fn: dict) -> int:
    """DB_ACQUIRE_TIMEOUT_MS as the function gets it: the template's, else Config's default."""
    env = {**template()["Globals"]["Function"]["Environment"]["Variables"],
           **fn.get("Properties", {}).get("Environment", {}).get("Variables", {})}
    if "DB_ACQUIRE_TIMEOUT_MS" in env:
        return int(env["DB_ACQUIRE_TIMEOUT_MS"])
    m = re.search(r'"DB_ACQUIRE_TIMEOUT_MS",\s*(\d+)', CONFIG_RS.read_text(encoding="utf-8"))
    assert m, "Config's DB_ACQUIRE_TIMEOUT_MS default not found"
    return int(m.group(1))


def database_role(fn: dict) -> str:
    """The database role a function logs in as (the default of its DB_USER parameter)."""
    env = {**template()["Globals"]["Function"]["Environment"]["Variables"],
           **fn.get("Properties", {}).get("Environment", {}).get("Variables", {})}
    return template()["Parameters"][env["DB_USER"]["Ref"]]["Default"]


def uses_database(binary: str) -> bool:
    # not-found has no database access; setup-roles logs in once as the master user.
    return binary not in ("not-found", SETUP_FUNCTION)


class StatementTimeouts(unittest.TestCase):
    """No statement outlives the invocation that sent it."""

    def test_both_roles_have_all_three_limits(self):
        settings = role_settings()
        for role in ("messenger_app", "messenger_migrator"):
            with self.subTest(role=role):
                self.assertEqual(
                    set(settings.get(role, {})),
                    {"statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"},
                )

    def test_limits_fit_every_function_that_logs_in_as_the_role(self):
        settings = role_settings()
        checked = set()
        for binary in EXPECTED_BINARIES:
            if not uses_database(binary):
                continue
            _, fn = function_by_binary(binary)
            role = database_role(fn)
            timeout_ms = fn_property(fn, "Timeout") * 1000
            limits = settings[role]
            with self.subTest(binary=binary, role=role):
                # Waiting for a connection, then one statement: done before Lambda gives up.
                self.assertLess(limits["statement_timeout"] + acquire_timeout_ms(fn), timeout_ms)
                self.assertLessEqual(limits["lock_timeout"], limits["statement_timeout"])
                self.assertLessEqual(limits["idle_in_transaction_session_timeout"], timeout_ms)
                checked.add(role)
        self.assertEqual(checked, {"messenger_app", "messenger_migrator"})

    def test_api_functions_time_out_at_ten_seconds(self):
        self.assertEqual(template()["Globals"]["Function"]["Timeout"], 10)
        self.assertLessEqual(role_settings()["messenger_app"]["statement_timeout"], 5000)

    def test_purge_batches_stay_far_under_the_app_roles_limit(self):
        # purge runs as messenger_app with 300 s, one statement per batch: a batch must take a
        # small fraction of statement_timeout. Measured: `make test-purge-backlog` (docs/TESTING.md).
        _, purge = function_by_binary("purge")
        self.assertEqual(database_role(purge), "messenger_app")
        batch = int(re.search(r"DEFAULT_BATCH_SIZE: i64 = ([\d_]+);",
                              PURGE_RS.read_text(encoding="utf-8")).group(1).replace("_", ""))
        readme = (REPO / "docs" / "TESTING.md").read_text(encoding="utf-8")
        rate = int(re.search(r"about ([\d,]+) rows/s", readme).group(1).replace(",", ""))
        batch_ms = 1000 * batch / rate
        # 10x for a slower database than the local one, and still 10x under the limit.
        self.assertLess(batch_ms * 10 * 10, role_settings()["messenger_app"]["statement_timeout"])

    def test_no_timeout_is_set_from_the_functions(self):
        # A session-level SET pins the client's connection to one RDS Proxy backend.
        for directory in ("common/src", "functions/src"):
            for path in (REPO / directory).rglob("*.rs"):
                text = path.read_text(encoding="utf-8")
                with self.subTest(file=str(path.relative_to(REPO))):
                    self.assertNotRegex(text, r"(?i)\bSET\s+(LOCAL\s+)?(statement|lock|idle_in_transaction_session)_timeout")
                    self.assertNotRegex(text, r'"(statement|lock)_timeout"')

    def test_readme_states_the_timeouts(self):
        text = README.read_text(encoding="utf-8")
        section = re.search(r"^## Timeouts\n(.*?)(?=^## )", text, re.M | re.S)
        self.assertTrue(section, "infra/README.md needs a Timeouts section")
        for role, limits in role_settings().items():
            with self.subTest(role=role):
                self.assertIn(role, section.group(1))
                self.assertIn(f"{limits['statement_timeout'] // 1000} s", section.group(1))


# ----------------------------------------------------------------------------- capacity


def instance_classes() -> dict[str, dict]:
    return infra()["Mappings"]["DbInstanceClasses"]


def proxy_pool() -> dict:
    (tg,) = resources(infra(), "AWS::RDS::DBProxyTargetGroup").values()
    return tg["Properties"]["ConnectionPoolConfigurationInfo"]


class CapacityFromTheInstanceClass(unittest.TestCase):
    """The stage throttle is derived from the database's connections."""

    def test_every_figure_follows_from_the_class_memory(self):
        percent = proxy_pool()["MaxConnectionsPercent"]
        self.assertTrue(instance_classes())
        for name, row in instance_classes().items():
            with self.subTest(instance_class=name):
                # RDS: LEAST(DBInstanceClassMemory / 9531392, 5000), planned at 75% of the
                # nominal memory (what RDS leaves for PostgreSQL).
                memory = row["MemoryGiB"] * 2**30 * 0.75
                max_connections = min(math.floor(memory / 9531392), 5000)
                self.assertEqual(row["MaxConnections"], max_connections)
                proxy = math.floor(max_connections * percent / 100)
                self.assertEqual(row["ProxyConnections"], proxy)
                # One request per proxy connection per second: at the full rate, a request may
                # hold its connection for the whole borrow timeout on average before any waits.
                self.assertLessEqual(row["ApiRateLimit"] * proxy_pool()["ConnectionBorrowTimeout"], proxy)
                self.assertEqual(row["ApiRateLimit"], proxy)
                # A burst never asks for more connections than the proxy has.
                self.assertLessEqual(row["ApiBurstLimit"], proxy)
                self.assertEqual(row["ConnectionsAlarm"], math.floor(0.8 * max_connections))
                self.assertLess(row["ConnectionsAlarm"], proxy)

    def test_the_instance_class_is_one_the_table_knows(self):
        param = infra()["Parameters"]["DbInstanceClass"]
        self.assertEqual(sorted(param["AllowedValues"]), sorted(instance_classes()))
        self.assertIn(param["Default"], instance_classes())

    def test_the_infra_stack_outputs_the_throttle_for_its_class(self):
        outputs = infra()["Outputs"]
        for output, column in (("ApiThrottlingRateLimit", "ApiRateLimit"),
                               ("ApiThrottlingBurstLimit", "ApiBurstLimit")):
            with self.subTest(output=output):
                self.assertEqual(outputs[output]["Value"], {
                    "Fn::FindInMap": ["DbInstanceClasses", {"Ref": "DbInstanceClass"}, column]})
                self.assertIn(output, template()["Parameters"])

    def test_app_defaults_are_the_default_class(self):
        row = instance_classes()[infra()["Parameters"]["DbInstanceClass"]["Default"]]
        params = template()["Parameters"]
        self.assertEqual(params["ApiThrottlingRateLimit"]["Default"], row["ApiRateLimit"])
        self.assertEqual(params["ApiThrottlingBurstLimit"]["Default"], row["ApiBurstLimit"])

    def test_each_instance_holds_one_connection(self):
        # The arithmetic counts one client connection per function instance.
        env = template()["Globals"]["Function"]["Environment"]["Variables"]
        self.assertEqual(str(env.get("DB_MAX_CONNECTIONS", "1")), "1")
        m = re.search(r'"DB_MAX_CONNECTIONS",\s*(\d+)', CONFIG_RS.read_text(encoding="utf-8"))
        self.assertEqual(m.group(1), "1")
        self.assertEqual(proxy_pool()["ConnectionBorrowTimeout"], 1)

    def test_readme_shows_the_arithmetic(self):
        text = README.read_text(encoding="utf-8")
        section = re.search(r"^## Capacity and overload\n(.*?)(?=^## )", text, re.M | re.S).group(1)
        row = instance_classes()[infra()["Parameters"]["DbInstanceClass"]["Default"]]
        for figure in ("9531392", str(row["MaxConnections"]), str(row["ProxyConnections"]),
                       "MaxConnectionsPercent", "ApiThrottlingRateLimit", "ApiThrottlingBurstLimit"):
            with self.subTest(figure=figure):
                self.assertIn(figure, section)


# ----------------------------------------------------------------------------- alarms


def alarms(doc: dict) -> dict[str, dict]:
    return {k: v["Properties"] for k, v in resources(doc, ALARM).items()}


def single_metric(alarm: dict) -> tuple[str, str, dict]:
    """(namespace, metric, {dimension: value}) of a one-metric alarm."""
    dims = {d["Name"]: d["Value"] for d in alarm.get("Dimensions", [])}
    return alarm["Namespace"], alarm["MetricName"], dims


def math_metrics(alarm: dict) -> tuple[list[dict], dict]:
    """([MetricStat of each input], the expression that decides) of a metric-math alarm."""
    inputs = [m for m in alarm["Metrics"] if "MetricStat" in m]
    (decides,) = [m for m in alarm["Metrics"] if m.get("ReturnData", True)]
    return inputs, decides


def find_alarm(doc: dict, namespace: str, metric: str, **dims) -> tuple[str, dict]:
    found = []
    for name, alarm in alarms(doc).items():
        if "MetricName" in alarm and single_metric(alarm)[:2] == (namespace, metric):
            if all(single_metric(alarm)[2].get(k) == v for k, v in dims.items()):
                found.append((name, alarm))
    assert len(found) == 1, f"{namespace} {metric} {dims}: {[n for n, _ in found]}"
    return found[0]


class AlarmsReachTheOperator(unittest.TestCase):
    def test_every_alarm_notifies_the_topic_parameter(self):
        for label, doc in (("template.yaml", template()), ("infra", infra()), ("translated", translated())):
            self.assertTrue(alarms(doc), label)
            for name, alarm in alarms(doc).items():
                with self.subTest(template=label, alarm=name):
                    self.assertEqual(alarm["AlarmActions"], [{"Ref": "AlarmTopicArn"}])
                    self.assertEqual(alarm["OKActions"], [{"Ref": "AlarmTopicArn"}])
                    self.assertTrue(alarm.get("AlarmDescription"))

    def test_topic_parameter(self):
        for label, doc in (("template.yaml", template()), ("infra", infra())):
            param = doc["Parameters"]["AlarmTopicArn"]
            with self.subTest(template=label):
                self.assertNotIn("Default", param)
                self.assertRegex("arn:aws:sns:us-east-1:123456789012:ops-alarms", param["AllowedPattern"])
                self.assertNotRegex("arn:aws:sqs:us-east-1:123456789012:ops", param["AllowedPattern"])
        self.assertEqual(infra()["Outputs"]["AlarmTopicArn"]["Value"], {"Ref": "AlarmTopicArn"})


class ApiAlarms(unittest.TestCase):
    def test_5xx_rate(self):
        (alarm,) = [a for a in alarms(template()).values()
                    if any(m.get("MetricStat", {}).get("Metric", {}).get("MetricName") == "5xx"
                           for m in a.get("Metrics", []))]
        inputs, decides = math_metrics(alarm)
        by_id = {m["Id"]: m["MetricStat"] for m in alarm["Metrics"] if "MetricStat" in m}
        self.assertEqual({s["Metric"]["MetricName"] for s in by_id.values()}, {"5xx", "Count"})
        for stat in by_id.values():
            self.assertEqual(stat["Metric"]["Namespace"], "AWS/ApiGateway")
            self.assertEqual(stat["Metric"]["Dimensions"], [{"Name": "ApiId", "Value": {"Ref": "HttpApi"}}])
            self.assertEqual(stat["Stat"], "Sum")
        errors = next(i for i, s in by_id.items() if s["Metric"]["MetricName"] == "5xx")
        requests = next(i for i, s in by_id.items() if s["Metric"]["MetricName"] == "Count")
        self.assertIn(f"100 * {errors} / {requests}", decides["Expression"])
        self.assertEqual(alarm["ComparisonOperator"], "GreaterThanThreshold")
        self.assertEqual(alarm["Threshold"], 5)  # percent
        self.assertEqual(alarm["TreatMissingData"], "notBreaching")

    def test_latency(self):
        _, alarm = find_alarm(template(), "AWS/ApiGateway", "Latency", ApiId={"Ref": "HttpApi"})
        self.assertEqual(alarm["ExtendedStatistic"], "p99")
        self.assertEqual(alarm["ComparisonOperator"], "GreaterThanOrEqualToThreshold")
        self.assertEqual(alarm["Threshold"], 2000)  # ms: overload must answer within 2 s
        self.assertLessEqual(alarm["Period"], 60)

    def test_api_alarms_point_at_the_translated_api(self):
        api = cfn_types()
        self.assertGreaterEqual(len(alarms(translated())), 8)
        for name, alarm in alarms(translated()).items():
            for ref in refs_in(alarm):
                if ref in ("AlarmTopicArn",):
                    continue
                with self.subTest(alarm=name, ref=ref):
                    self.assertIn(api.get(ref), ("AWS::ApiGatewayV2::Api", "AWS::Lambda::Function"))


def cfn_types() -> dict[str, str]:
    return {k: v["Type"] for k, v in translated()["Resources"].items()}


def refs_in(value) -> list[str]:
    if isinstance(value, dict):
        if set(value) == {"Ref"}:
            return [value["Ref"]]
        return [r for v in value.values() for r in refs_in(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs_in(v)]
    return []


class FunctionAlarms(unittest.TestCase):
    def lambda_metric_alarms(self, metric: str) -> dict[str, tuple[dict, set[str]]]:
        """{alarm: (properties, {binary})} of the metric-math alarms summing `metric`."""
        out = {}
        for name, alarm in alarms(translated()).items():
            if "Metrics" not in alarm:
                continue
            inputs, decides = math_metrics(alarm)
            stats = [m["MetricStat"] for m in inputs]
            if not stats or any(s["Metric"]["Namespace"] != "AWS/Lambda" for s in stats):
                continue
            if {s["Metric"]["MetricName"] for s in stats} != {metric}:
                continue
            fns = set()
            for s in stats:
                (dim,) = s["Metric"]["Dimensions"]
                self.assertEqual(dim["Name"], "FunctionName")
                logical_id = dim["Value"]["Ref"]
                self.assertEqual(cfn_types()[logical_id], "AWS::Lambda::Function")
                fns.add(binary_of(translated()["Resources"][logical_id]))
                self.assertEqual(s["Stat"], "Sum")
            ids = sorted(m["Id"] for m in inputs)
            self.assertEqual(decides["Expression"], f"SUM([{', '.join(ids)}])")
            self.assertLessEqual(len(alarm["Metrics"]), 10, "CloudWatch's limit per alarm")
            out[name] = (alarm, fns)
        return out

    def assert_covers(self, metric: str, expected: set[str]):
        found = self.lambda_metric_alarms(metric)
        covered = [b for _, fns in found.values() for b in fns]
        self.assertEqual(sorted(covered), sorted(expected), f"each function in one {metric} alarm")
        for name, (alarm, _) in found.items():
            with self.subTest(alarm=name):
                self.assertEqual(alarm["ComparisonOperator"], "GreaterThanOrEqualToThreshold")
                self.assertEqual(alarm["Threshold"], 1)
                self.assertEqual(alarm["TreatMissingData"], "notBreaching")

    def test_errors_of_every_request_function(self):
        # purge has its own (PurgeFailures); migrate and setup-roles are run by the operator.
        self.assert_covers("Errors", EXPECTED_BINARIES - OPERATOR_FUNCTIONS - {"purge"})

    def test_throttles_of_every_function_but_the_operators(self):
        self.assert_covers("Throttles", EXPECTED_BINARIES - OPERATOR_FUNCTIONS)

    def test_purge_failures(self):
        purge_id, _ = function_by_binary("purge")
        _, alarm = find_alarm(translated(), "AWS/Lambda", "Errors", FunctionName={"Ref": purge_id})
        self.assertEqual(alarm["Statistic"], "Sum")
        self.assertEqual((alarm["ComparisonOperator"], alarm["Threshold"]), ("GreaterThanOrEqualToThreshold", 1))
        self.assertLessEqual(alarm["Period"], 3600)  # one run an hour

    def test_purge_not_run(self):
        purge_id, _ = function_by_binary("purge")
        _, alarm = find_alarm(translated(), "AWS/Lambda", "Invocations", FunctionName={"Ref": purge_id})
        self.assertEqual((alarm["ComparisonOperator"], alarm["Threshold"]), ("LessThanThreshold", 1))
        self.assertEqual(alarm["TreatMissingData"], "breaching")  # no data is no run
        self.assertGreater(alarm["Period"] * alarm["EvaluationPeriods"], 3600)  # more than one slot


class DatabaseAlarms(unittest.TestCase):
    DB = {"DBInstanceIdentifier": {"Ref": "Database"}}

    def test_cpu(self):
        _, alarm = find_alarm(infra(), "AWS/RDS", "CPUUtilization", **self.DB)
        self.assertEqual(alarm["Statistic"], "Average")
        self.assertEqual((alarm["ComparisonOperator"], alarm["Threshold"]), ("GreaterThanOrEqualToThreshold", 80))

    def test_free_storage(self):
        _, alarm = find_alarm(infra(), "AWS/RDS", "FreeStorageSpace", **self.DB)
        self.assertEqual(alarm["Statistic"], "Minimum")
        self.assertEqual(alarm["ComparisonOperator"], "LessThanThreshold")
        smallest = infra()["Parameters"]["DbAllocatedStorageGiB"]["MinValue"] * 2**30
        self.assertEqual(alarm["Threshold"], smallest // 10)  # bytes

    def test_connections(self):
        _, alarm = find_alarm(infra(), "AWS/RDS", "DatabaseConnections", **self.DB)
        self.assertEqual(alarm["Statistic"], "Maximum")
        self.assertEqual(alarm["ComparisonOperator"], "GreaterThanOrEqualToThreshold")
        self.assertEqual(alarm["Threshold"], {
            "Fn::FindInMap": ["DbInstanceClasses", {"Ref": "DbInstanceClass"}, "ConnectionsAlarm"]})

    def test_database_alarms_live_with_the_database(self):
        self.assertEqual(len([a for a in alarms(infra()).values() if a.get("Namespace") == "AWS/RDS"]), 3)
        for name, alarm in alarms(template()).items():
            with self.subTest(alarm=name):
                self.assertNotIn("AWS/RDS", repr(alarm))

    def test_readme_lists_every_alarm(self):
        text = README.read_text(encoding="utf-8")
        section = re.search(r"^## Alarms\n(.*?)(?=^## )", text, re.M | re.S)
        self.assertTrue(section, "infra/README.md needs an Alarms section")
        for name in [*alarms(template()), *alarms(infra())]:
            with self.subTest(alarm=name):
                self.assertIn(f"`{name}`", section.group(1))


# ----------------------------------------------------------------------------- environment key


CRYPTO = {"kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:GenerateDataKey",
          "kms:GenerateDataKeyWithoutPlaintext", "kms:GenerateDataKeyPair", "kms:CreateGrant"}


def key_statements() -> dict[str, dict]:
    (key,) = resources(infra(), "AWS::KMS::Key").values()
    return {s["Sid"]: s for s in key["Properties"]["KeyPolicy"]["Statement"]}


class FunctionEnvironmentKey(unittest.TestCase):
    """Issue 12 item 6: the environments (JWT_SECRET, METRICS_TOKEN) under a customer-managed key."""

    def test_every_translated_function_uses_the_key(self):
        fns = resources(translated(), "AWS::Lambda::Function")
        self.assertEqual(len(fns), len(EXPECTED_BINARIES))
        for logical_id, fn in fns.items():
            with self.subTest(function=logical_id):
                self.assertEqual(fn["Properties"].get("KmsKeyArn"), {"Ref": "FunctionEnvironmentKeyArn"})

    def test_set_once_in_globals(self):
        self.assertTrue(is_ref(template()["Globals"]["Function"]["KmsKeyArn"], "FunctionEnvironmentKeyArn"))
        for logical_id, fn in functions().items():
            with self.subTest(function=logical_id):
                self.assertNotIn("KmsKeyArn", fn["Properties"], "no function may override it")

    def test_parameter_comes_from_the_infra_stack(self):
        param = template()["Parameters"]["FunctionEnvironmentKeyArn"]
        self.assertNotIn("Default", param)
        self.assertRegex("arn:aws:kms:us-east-1:123456789012:key/0123abcd-4567-89ef-0123-456789abcdef",
                         param["AllowedPattern"])
        self.assertNotRegex("arn:aws:kms:us-east-1:123456789012:alias/aws/lambda", param["AllowedPattern"])
        (key_id,) = resources(infra(), "AWS::KMS::Key")
        self.assertEqual(infra()["Outputs"]["FunctionEnvironmentKeyArn"]["Value"],
                         {"Fn::GetAtt": [key_id, "Arn"]})

    def test_key_rotates(self):
        (key,) = resources(infra(), "AWS::KMS::Key").values()
        self.assertIs(key["Properties"]["EnableKeyRotation"], True)
        self.assertEqual(key["Properties"].get("KeySpec", "SYMMETRIC_DEFAULT"), "SYMMETRIC_DEFAULT")

    def test_only_this_account_is_a_principal(self):
        root = {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}
        for sid, s in key_statements().items():
            with self.subTest(statement=sid):
                self.assertEqual(s["Effect"], "Allow")
                self.assertEqual(s["Principal"], {"AWS": root})
                self.assertNotIn("NotAction", s)
                self.assertNotIn("NotPrincipal", s)
                for action in as_list(s["Action"]):
                    self.assertRegex(action, r"^kms:[A-Za-z]+$", "named actions only, no wildcard")

    def test_administration_cannot_read(self):
        admin = key_statements()["AdministerTheKey"]
        self.assertFalse(set(as_list(admin["Action"])) & CRYPTO)
        self.assertNotIn("Condition", admin)
        self.assertIn("kms:PutKeyPolicy", admin["Action"])  # the key stays manageable
        self.assertIn("kms:ScheduleKeyDeletion", admin["Action"])

    def test_crypto_only_through_lambda_for_the_app_stacks_functions(self):
        used = set()
        for sid, s in key_statements().items():
            actions = set(as_list(s["Action"]))
            if not actions & CRYPTO:
                continue
            used |= actions
            cond = s["Condition"]
            with self.subTest(statement=sid):
                self.assertEqual(cond["StringEquals"]["kms:ViaService"],
                                 {"Fn::Sub": "lambda.${AWS::Region}.amazonaws.com"})
                self.assertEqual(cond["StringEquals"]["kms:CallerAccount"], {"Ref": "AWS::AccountId"})
                if actions == {"kms:CreateGrant"}:
                    # Grants only for an AWS resource: Lambda's per-function grant.
                    self.assertIs(cond["Bool"]["kms:GrantIsForAWSResource"], True)
                else:
                    self.assertEqual(actions, {"kms:Encrypt", "kms:Decrypt"})
                    self.assertEqual(cond["StringLike"]["kms:EncryptionContext:aws:lambda:FunctionArn"], {
                        "Fn::Sub": "arn:${AWS::Partition}:lambda:${AWS::Region}:${AWS::AccountId}"
                                   ":function:${AppStackName}-*"})
        self.assertEqual(used, {"kms:Encrypt", "kms:Decrypt", "kms:CreateGrant"})

    def test_app_stack_name_is_the_deployed_one(self):
        param = infra()["Parameters"]["AppStackName"]
        self.assertEqual(param["Default"], "secure-messenger")
        script = (REPO / "scripts" / "deploy-infra.sh").read_text(encoding="utf-8")
        self.assertIn('AppStackName=$app_stack', script)
        self.assertIn('AlarmTopicArn=$ALARM_TOPIC_ARN', script)

    def test_readme_says_who_can_read_what(self):
        text = README.read_text(encoding="utf-8")
        section = re.search(r"^## Who can read which secret\n(.*?)(?=^## )", text, re.M | re.S)
        self.assertTrue(section, "infra/README.md needs a 'Who can read which secret' section")
        for needle in ("JWT_SECRET", "METRICS_TOKEN", "KmsKeyArn", "kms:Decrypt",
                       "lambda:GetFunctionConfiguration", "secretsmanager:GetSecretValue", "grant"):
            with self.subTest(needle=needle):
                self.assertIn(needle, section.group(1))


if __name__ == "__main__":
    unittest.main()
