"""The Makefile targets a reader is told to run find every program they call.

`make -n TARGET` prints each command line without running it (no build, no AWS call); each
line's program, and the programs it runs by name (`sam build` runs `cargo-lambda`, which runs
`cargo` and, for arm64, zig through the ziglang wheel's `python3 -m ziglang`), must be found on
the PATH that line sets.

Run: .venv/bin/python -m unittest discover -s infra/tests -v   (infra/check.sh does).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"

# What a program runs by name, beyond itself.
CALLS = {
    "sam": {"build": ["cargo-lambda", "cargo", "python3"]},
    "cargo-lambda": {"build": ["cargo", "python3"]},
}


def dry_run(target: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    out = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def base_path() -> str:
    """This PATH without .venv/bin: a target must put it there itself (an activated venv hid it)."""
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != VENV_BIN.resolve())


def commands(line: str):
    """(PATH, argv) of each `&&`-joined command of a shell line, PATH as the line sets it."""
    for part in re.split(r"\s*&&\s*", line):
        words = shlex.split(part)
        path = base_path()
        while words and re.match(r"^[A-Z_]+=", words[0]):
            name, value = words.pop(0).split("=", 1)
            if name == "PATH":
                path = value.replace("$PATH", base_path())
        if words:
            yield path, words


def found(program: str, path: str) -> str | None:
    if "/" in program:
        candidate = REPO / program
        return str(candidate) if os.access(candidate, os.X_OK) else None
    return shutil.which(program, path=path)


@unittest.skipUnless(VENV_BIN.is_dir(), ".venv is not installed (make tools)")
class TargetsFindTheirPrograms(unittest.TestCase):
    def check(self, target: str, must_run: str):
        lines = dry_run(target)
        self.assertTrue(any(must_run in line for line in lines), f"make {target} no longer runs {must_run}: {lines}")
        for line in lines:
            for path, argv in commands(line):
                program = argv[0]
                with self.subTest(target=target, program=program):
                    self.assertIsNotNone(found(program, path), f"make {target}: {program} is not found")
                name = Path(program).name
                for sub, called in CALLS.get(name, {}).items():
                    if sub not in argv[1:2] and not (name == "cargo-lambda" and sub in argv[2:3]):
                        continue
                    for callee in called:
                        with self.subTest(target=target, program=program, calls=callee):
                            where = shutil.which(callee, path=path)
                            self.assertIsNotNone(where, f"make {target}: {program} {sub} runs {callee}, "
                                                        f"which is not on its PATH")
                            if callee in ("cargo-lambda", "python3"):
                                # cargo-lambda, and the python3 that has the ziglang wheel: .venv's.
                                self.assertEqual(Path(where).parent, VENV_BIN,
                                                 f"make {target}: {callee} must come from .venv/bin, got {where}")

    def test_deploy_finds_cargo_lambda(self):
        # `sam build` stopped with "Cannot find Cargo Lambda" when only `build` set PATH.
        self.check("deploy", "sam build")

    def test_build_targets(self):
        self.check("build", "cargo-lambda lambda build")
        self.check("build-x86", "cargo-lambda lambda build")


class DeployUsesTheCliRegion(unittest.TestCase):
    def test_the_example_config_fixes_no_region(self):
        # make deploy-infra deploys to the AWS CLI's region (scripts/aws-common.sh); a region fixed
        # in samconfig.toml would put the app stack elsewhere than its network and database.
        import tomllib

        with (REPO / "infra" / "samconfig.toml.example").open("rb") as f:
            config = tomllib.load(f)
        for command, table in config["default"].items():
            with self.subTest(command=command):
                self.assertNotIn("region", table.get("parameters", {}))


class DevInstallsOnlyWhatItUses(unittest.TestCase):
    def test_dev_does_not_install_test_tools(self):
        text = "\n".join(dry_run("dev"))
        for tool in ("cargo-nextest", "cargo install"):
            self.assertNotIn(tool, text, f"make dev installs {tool}, which only make test uses")
        self.assertIn("ensure-venv.sh", text)

    def test_test_still_installs_nextest(self):
        tools = re.search(r"^tools:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
        self.assertTrue(tools and "cargo-nextest" in tools.group(1), "make tools no longer installs cargo-nextest")
        self.assertRegex((REPO / "Makefile").read_text(encoding="utf-8"), r"(?m)^test: tools\b")


if __name__ == "__main__":
    unittest.main()
