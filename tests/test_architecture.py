"""The package's layers (pyproject.toml, [tool.importlinter]): no module imports a layer above its own, checked by
import-linter on the package as it is, and shown to fail on a copy of it with one upward import added."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports; import sys; sys.exit(lint_imports(no_cache=True))"


def _lint(where: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT], cwd=where, env={"PYTHONPATH": str(where), "PATH": ""},
                          capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_an_upward_import_breaks_it(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "mlx_aim", copy / "mlx_aim", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    config = copy / "mlx_aim" / "models" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _upward():\n    from ..training import runs  # noqa: F401\n")
    done = _lint(copy)
    assert done.returncode != 0
    assert "mlx_aim.models is not allowed to import mlx_aim.training" in done.stdout
    assert "mlx_aim.models.config -> mlx_aim.training.runs" in done.stdout
