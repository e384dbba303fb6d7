"""Dev-only tools (channels_dev) stay out of production code paths: the
images do not install that package, so a production module that imports it
would fail there, and only there."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_SOURCES = [ROOT / "libs/common/src", *sorted((ROOT / "services").glob("*/src"))]


def _module_level_imports(tree: ast.Module):
    """Imports that run when the module is imported (not inside a function)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            yield node, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node, [node.module]
        pending.extend(ast.iter_child_nodes(node))


def test_no_production_module_imports_channels_dev_when_imported():
    offenders = []
    for root in PRODUCTION_SOURCES:
        for path in root.rglob("*.py"):
            if "build" in path.relative_to(root).parts:
                continue
            for node, names in _module_level_imports(ast.parse(path.read_text(), str(path))):
                if any(name == "channels_dev" or name.startswith("channels_dev.") for name in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], f"channels_dev imported at module level by production code: {offenders}"


def test_the_services_start_their_apps_without_channels_dev(tmp_path):
    # channels_dev hidden as it is in an image: its import fails.
    blocker = tmp_path / "channels_dev.py"
    blocker.write_text("raise ModuleNotFoundError('channels_dev is not installed', name='channels_dev')\n")
    code = (
        "import sys\n"
        "from channels_common.settings import PlaygroundSettings\n"
        "import channels_records.app, channels_collab.app, channels_bots.app\n"
        "from channels_records.playground import playground_routes\n"
        "assert playground_routes(PlaygroundSettings(RAILS_ENV='production')) == []\n"
        "assert playground_routes(PlaygroundSettings(RAILS_ENV='development')) == []\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
