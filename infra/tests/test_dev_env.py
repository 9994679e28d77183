"""`make dev` takes any valid setting: scripts/lambda-env.sh writes the functions' environment to
the file `cargo lambda watch --env-file` reads, and every value must come back byte for byte.

Read back with cargo-lambda itself (.venv/bin/cargo-lambda, the binary `make dev` runs):
`cargo lambda deploy --dry --env-file FILE` reads the file through the same function as
`cargo lambda watch --env-file` (cargo-lambda-metadata's lambda_environment, i.e. the
env-file-reader crate) and prints the variables it got as a Rust `{:?}` map, without any AWS call.
On a file it cannot parse it prints an empty map (watch stops with `invalid environment file`).

Run: .venv/bin/python -m unittest discover -s infra/tests -v   (infra/check.sh does).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_template import API_MD, needs_contract  # noqa: E402
from test_template import without_contract_checks as load_tests  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[2]
LAMBDA_ENV = REPO / "scripts" / "lambda-env.sh"
CARGO_LAMBDA = REPO / ".venv" / "bin" / "cargo-lambda"

# Settings that broke the unquoted file, and worse: a query string, a password with every
# character the format treats specially, both kinds of quote with a backtick, a keyword of the
# format, whitespace and a raw newline, non-ASCII, trailing backslashes.
VALUES = {
    "DATABASE_URL": "postgres://messenger:p%23ss%24@127.0.0.1:5432/messenger?sslmode=disable&connect_timeout=5",
    "JWT_SECRET": "s3cr#t $HOME ${X} 'single' \"double\" a=b ==\\ end",
    "METRICS_TOKEN": "tok'en`with\"all#=$ of them\\\"",
    "JWT_ISSUER": "export",
    "JWT_AUDIENCE": " padded\twith tab and\nnewline ",
    "DB_SSL_ROOT_CERT": "/tmp/a dir/ünïcødé cert.pem",
    "CORS_ALLOWED_ORIGINS": "https://a.example,https://b.example",
    "RUST_LOG": "info,functions=debug",
    "DB_USER": "user\\",
    "DB_NAME": "it's\\",
    "JWT_TTL_SECONDS": "900",
}
# Values no quoting of the format carries: left out of the file, inherited from the environment.
UNWRITABLE = {
    "DB_HOST": "a\\nb",
    "DB_IAM_AUTH": "'`\\",
}
DEFAULTS = {"BCRYPT_COST": "10"}


def listed_variables() -> list[str]:
    text = LAMBDA_ENV.read_text(encoding="utf-8")
    body = re.search(r"^vars=\((.*?)\)", text, re.M | re.S)
    assert body, "lambda-env.sh has no vars=(...) list"
    return body.group(1).split()


def rust_debug_map(text: str) -> dict[str, str]:
    """Parses the `{"KEY": "value", ...}` that Rust's Debug prints for a HashMap<String, String>."""
    string = r'"((?:[^"\\]|\\.)*)"'
    pairs = re.findall(rf"{string}: {string}", text)
    rest = re.sub(rf"{string}: {string}", "", text)
    assert re.fullmatch(r"\{(, )*\}", rest), f"not a map of strings: {text}"

    def unescape(s: str) -> str:
        simple = {"n": "\n", "r": "\r", "t": "\t", "0": "\0", "\\": "\\", '"': '"', "'": "'"}

        def one(m: re.Match) -> str:
            if m.group(1):
                return chr(int(m.group(1), 16))
            return simple[m.group(2)]

        return re.sub(r"\\(?:u\{([0-9a-f]+)\}|(.))", one, s)

    return {unescape(k): unescape(v) for k, v in pairs}


def cargo_lambda_reads(env_file: Path) -> dict[str, str]:
    """What cargo-lambda reads from env_file."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "Cargo.toml").write_text(
            '[package]\nname = "probe"\nversion = "0.0.0"\nedition = "2021"\n[workspace]\n', encoding="utf-8")
        (tmp / "src").mkdir()
        (tmp / "src" / "main.rs").write_text("fn main() {}\n", encoding="utf-8")
        # Any Linux executable will do as the function's binary: it is only zipped.
        binary = tmp / "bootstrap"
        shutil.copy(os.path.realpath(shutil.which("true")), binary)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="probe", AWS_SECRET_ACCESS_KEY="probe",
                   AWS_EC2_METADATA_DISABLED="true")
        result = subprocess.run(
            [str(CARGO_LAMBDA), "lambda", "deploy", "--dry", "--binary-path", str(binary),
             "--env-file", str(env_file), "--lambda-dir", str(tmp / "lambda"), "probe"],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr + result.stdout
        line = re.search(r"^  - env_options: (\{.*\})$", result.stdout, re.M)
        assert line, f"no env_options in cargo lambda's dry run:\n{result.stdout}"
        return rust_debug_map(line.group(1))


@unittest.skipUnless(CARGO_LAMBDA.is_file(), "needs .venv/bin/cargo-lambda (scripts/ensure-venv.sh)")
class DevEnvironmentFile(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.file = Path(cls.tmp.name) / "dev.env"
        env = {k: v for k, v in os.environ.items() if k not in listed_variables()}
        env.update(VALUES)
        env.update(UNWRITABLE)
        result = subprocess.run(["bash", str(LAMBDA_ENV), str(cls.file)], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        cls.notes = result.stderr
        cls.read = cargo_lambda_reads(cls.file)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_the_values_are_variables_lambda_env_passes(self):
        self.assertLessEqual(set(VALUES) | set(UNWRITABLE), set(listed_variables()))

    def test_every_value_comes_back_byte_for_byte(self):
        for name, value in VALUES.items():
            with self.subTest(variable=name):
                self.assertEqual(self.read.get(name), value)

    def test_nothing_else_is_in_the_file(self):
        self.assertEqual(self.read, {**VALUES, **DEFAULTS})

    def test_unwritable_values_are_left_to_the_environment_with_a_note(self):
        for name in UNWRITABLE:
            with self.subTest(variable=name):
                self.assertNotIn(name, self.read)
                self.assertIn(f"lambda-env: {name} is not in", self.notes)
        self.assertEqual(len(self.notes.splitlines()), len(UNWRITABLE), self.notes)

    def test_the_file_is_private(self):
        self.assertEqual(self.file.stat().st_mode & 0o777, 0o600)


@unittest.skipUnless(CARGO_LAMBDA.is_file(), "needs .venv/bin/cargo-lambda (scripts/ensure-venv.sh)")
class TheReaderIsTheOneThatFailed(unittest.TestCase):
    def test_an_unquoted_query_string_does_not_parse(self):
        # What lambda-env.sh wrote before: `make dev` stopped with `invalid environment file`.
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "dev.env"
            file.write_text(f"RUST_LOG=info\nDATABASE_URL={VALUES['DATABASE_URL']}\n", encoding="utf-8")
            self.assertEqual(cargo_lambda_reads(file), {})
            file.write_text(f"RUST_LOG=info\nDATABASE_URL='{VALUES['DATABASE_URL']}'\n", encoding="utf-8")
            self.assertEqual(cargo_lambda_reads(file), {"RUST_LOG": "info", "DATABASE_URL": VALUES["DATABASE_URL"]})


class EveryVariable(unittest.TestCase):
    @needs_contract
    def test_every_variable_of_the_configuration_table_is_passed(self):
        table = set(re.findall(r"^\|\s*`([A-Z0-9_]+)`\s*\|", API_MD.read_text(encoding="utf-8"), re.M))
        self.assertLessEqual(table, set(listed_variables()), "add them to vars=(...) in scripts/lambda-env.sh")


if __name__ == "__main__":
    unittest.main()
