"""The README as a newcomer follows it, and the pages it sends them to.

- its prerequisites name the Rust version Cargo.toml requires;
- the walk can be followed by the client section, and run twice: its users are not the client
  section's, each has a key of its own, "rotates his key" sends a key not used before, and both
  accounts are deleted at the end;
- the docs/ pages link only what the repository holds, and no document cites an issue number
  (a reference a reader of the repository cannot follow).

Run: .venv/bin/python -m unittest discover -s infra/tests -v   (infra/check.sh does).
"""

from __future__ import annotations

import re
import tomllib
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def section(text: str, title: str) -> str:
    match = re.search(rf"(?ms)^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text)
    assert match, f"README.md has no section '{title}'"
    return match.group(1)


def code(text: str) -> str:
    return "\n".join(re.findall(r"(?ms)^```sh\n(.*?)^```", text))


class Prerequisites(unittest.TestCase):
    def test_rust_version_is_cargo_tomls(self):
        with (REPO / "Cargo.toml").open("rb") as f:
            version = tomllib.load(f)["workspace"]["package"]["rust-version"]
        text = section(README.read_text(encoding="utf-8"), "Prerequisites")
        self.assertIn(f"Rust {version} or newer", text)
        for tool in ("python3", "venv", "psql", "pg_isready", "openssl", "jq", "curl"):
            with self.subTest(tool=tool):
                self.assertIn(f"`{tool}`", text)


class TheWalk(unittest.TestCase):
    def setUp(self):
        text = README.read_text(encoding="utf-8")
        self.walk = code(section(text, "A walk through the API"))
        self.client = code(section(text, "Try it with the client"))

    def test_users_are_not_the_client_sections(self):
        walk_users = set(re.findall(r'\\"name\\":\\"([^\\"]+)\\"', self.walk))
        client_users = set(re.findall(r"messenger --profile \S+ register (\S+)", self.client))
        self.assertEqual(len(walk_users), 2, walk_users)
        self.assertTrue(client_users, "the client section registers nobody")
        lower = {u.lower() for u in walk_users}
        self.assertFalse(lower & {u.lower() for u in client_users}, "the client section would get 409")

    def test_each_user_has_a_key_of_its_own(self):
        keys = re.findall(r'\\"public_key\\":\$(\w+)', self.walk)
        registered = keys[:2]
        self.assertEqual(len(set(registered)), 2, f"both users register with {registered}")
        for name in registered:
            with self.subTest(key=name):
                self.assertEqual(len(re.findall(rf"^{name}=\$\(openssl genpkey", self.walk, re.M)), 1)

    def test_the_rotation_sends_a_new_key(self):
        update = re.search(r"update-key.*?\\\"public_key\\\":\$(\w+)", self.walk, re.S)
        self.assertTrue(update, "the walk no longer rotates a key")
        new = update.group(1)
        self.assertRegex(self.walk, rf"(?m)^{new}=\$\(openssl genpkey", "the rotation's key is made fresh")
        before = self.walk[: update.start()]
        self.assertFalse(f"${new}" in before, f"${new}, the rotation's key, was used before it")

    def test_both_users_leave(self):
        deletions = re.findall(r"-X DELETE \$API/me -H \"authorization: Bearer \$(\w+)\"", self.walk)
        self.assertEqual(len(set(deletions)), 2, deletions)

    def test_devices_are_still_walked(self):
        for step in ("/devices/link-codes", "$API/devices ", "/messages/devices", "-X DELETE $API/devices/2"):
            with self.subTest(step=step):
                self.assertIn(step, self.walk)


class Documents(unittest.TestCase):
    DOCS = [
        REPO / "README.md",
        REPO / "infra" / "README.md",
        REPO / "vendor" / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
    ]

    def test_docs_links_resolve_inside_the_repository(self):
        for page in (REPO / "docs").glob("*.md"):
            for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
                if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
                    continue
                with self.subTest(page=page.name, link=link):
                    target = (page.parent / link.split("#", 1)[0]).resolve()
                    self.assertTrue(target.is_relative_to(REPO), f"{link} is outside the repository")
                    self.assertTrue(target.exists(), f"{link} does not exist")

    def test_the_layout_names_every_bench_part_and_client_module(self):
        design = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
        rows = {m.group(1): m.group(2) for m in re.finditer(r"(?m)^\| `(bench|client)/` \|(.*)$", design)}
        self.assertEqual(set(rows), {"bench", "client"}, "docs/DESIGN.md's layout lost a row")
        parts = [
            p.stem for p in (REPO / "bench" / "src").glob("*.rs")
            if p.stem != "main" and re.search(r"fn phase", p.read_text(encoding="utf-8"))
        ]
        modules = [p.stem for p in (REPO / "client" / "src").iterdir() if p.stem not in ("lib", "main")]
        for row, names in (("bench", parts), ("client", modules)):
            for name in names:
                with self.subTest(row=row, module=name):
                    self.assertIn(f"`{name}`", rows[row])

    def test_no_issue_numbers(self):
        for page in self.DOCS:
            with self.subTest(page=str(page.relative_to(REPO))):
                self.assertNotRegex(page.read_text(encoding="utf-8"), r"(?i)\bissues? \d+")


if __name__ == "__main__":
    unittest.main()
