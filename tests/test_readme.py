"""The README stays true: its settings table is the code's, its commands are the ones CI runs."""

from __future__ import annotations

import re
import subprocess
import sys

from .services import REPO


def test_settings_table_matches_the_code():
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "settings_table.py")], capture_output=True,
                           text=True, check=True).stdout.strip()
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- settings-table.*?-->\n(.*?)\n<!-- /settings-table -->", readme, re.S)
    assert block, "the README lost its settings-table markers"
    assert block.group(1).strip() == table, "README settings table is stale: regenerate it with scripts/settings_table.py"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/setup --test && scripts/test" in readme
    assert "scripts/setup --test && scripts/test" in ci
