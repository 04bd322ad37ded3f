"""The documentation as a reader of a fresh clone meets it: every relative link of README.md and docs/*.md
resolves inside the repository (files, and #anchors to headings), and the test run prints its seed even
under -q (make test)."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def _links(path: str):
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # code blocks hold no links
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        yield target


def test_the_docs_have_links_to_check():
    assert len(DOCS) >= 2 and any(t.startswith("docs/math.md") for t in _links(DOCS[0]))


@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(d, ROOT) for d in DOCS])
def test_every_relative_link_resolves_inside_the_repository(doc):
    broken = []
    for target in _links(doc):
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(doc), file_part)) if file_part else doc
        if not (dest == ROOT or dest.startswith(ROOT + os.sep)):
            broken.append("%s (outside the repository)" % target)
        elif not os.path.exists(dest):
            broken.append("%s (no such file)" % target)
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            broken.append("%s (no such heading)" % target)
    assert not broken, "%s: %s" % (os.path.relpath(doc, ROOT), ", ".join(broken))


def test_quiet_test_runs_print_the_seed():
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(ROOT, "tests", "test_docs.py"), "-k", "have_links"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "MIM_FAST_TEST_SEED": "12345"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MIM_FAST_TEST_SEED=12345" in res.stdout
