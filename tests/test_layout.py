"""The package's rooms: the offline tools (`tokenfeed.tools`) stay out of the daemon."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_cli_imports_the_offline_tools():
    importers = sorted(
        str(path.relative_to(ROOT))
        for folder in ("common", "producer", "consumer")
        for path in (ROOT / folder).glob("*.py")
        if any(m == "tokenfeed.tools" or m.startswith("tokenfeed.tools.")
               for m in _imported_modules(path))
    )
    assert importers == ["producer/cli.py"]


def test_the_daemon_and_its_workers_load_no_offline_tool():
    code = ("import sys, tokenfeed.producer.daemon, tokenfeed.producer.worker; "
            "print(sorted(m for m in sys.modules if m.startswith('tokenfeed.tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
