"""scripts/check_demo.py, CI's comparison of the quickstart's table with the README's."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

TABLE = "| Task | Acc |\n|---|---:|\n| Object Color | 62.0 |\n| Avg | 37.0 |\n"


def _check(tmp_path, readme_table: str, printed: str) -> subprocess.CompletedProcess:
    readme = tmp_path / "README.md"
    readme.write_text(f"# demo\n\ntext\n<!-- demo-table -->\n{readme_table}<!-- /demo-table -->\n| not | this |\n")
    results = tmp_path / "results.md"
    results.write_text(f"# mvbench_synthetic\n\n{printed}")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "check_demo.py"), str(readme), str(results)],
                          capture_output=True, text=True)


def test_equal_tables_pass(tmp_path):
    proc = _check(tmp_path, TABLE, TABLE)
    assert proc.returncode == 0, proc.stderr
    assert "equals" in proc.stdout


def test_another_figure_fails_with_the_difference(tmp_path):
    proc = _check(tmp_path, TABLE, TABLE.replace("37.0", "39.3"))
    assert proc.returncode == 1
    assert "-| Avg | 37.0 |" in proc.stderr and "+| Avg | 39.3 |" in proc.stderr


def test_readme_without_the_block_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("# no table\n")
    (tmp_path / "results.md").write_text(TABLE)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_demo.py"), str(tmp_path / "README.md"),
                           str(tmp_path / "results.md")], capture_output=True, text=True)
    assert proc.returncode == 1 and "no <!-- demo-table -->" in proc.stderr
