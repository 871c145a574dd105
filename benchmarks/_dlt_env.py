"""The dlt anchor's own venv (and dagster-dlt's, for the optional context row): created and
installed by the benchmark, reused while its pins hold.

dlt runs in a venv of its own so that neither project pulls the other's dependencies (or their
import costs) into its measurements. Standard library only, like _measure.py.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Ignored by git (benchmarks/.gitignore); delete it to reinstall.
DEFAULT_VENV = HERE / ".dlt-venv"
# Verified with benchmarks/_dlt_runner.py on 2026-12-01 (Python 3.11): dlt's rest_api source
# with the corrected configuration, Parquet through pyarrow into DuckDB.
DLT_REQUIREMENTS: tuple[str, ...] = ("dlt[duckdb]==1.31.0", "pyarrow==26.0.1")
# dagster-dlt's @dlt_assets over the same configuration (--parts dagster-dlt): its own venv, so
# the dlt anchor's stays free of Dagster. dagster-dlt 0.29.27 goes with dagster 1.13.27, the
# project's Dagster.
DEFAULT_DAGSTER_DLT_VENV = HERE / ".dagster-dlt-venv"
DAGSTER_DLT_REQUIREMENTS: tuple[str, ...] = (*DLT_REQUIREMENTS, "dagster==1.13.27", "dagster-dlt==0.29.27")
# Written once the install succeeded: a venv without it (an install cut short) is rebuilt.
MARKER = "bench-requirements.txt"
REPORTED_PACKAGES = ("dlt", "pyarrow", "duckdb")


class VenvFailed(RuntimeError):
    pass


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(
    venv: Path = DEFAULT_VENV,
    requirements: Sequence[str] = DLT_REQUIREMENTS,
    log: Callable[[str], None] = print,
) -> Path:
    """The venv's python, after creating the venv and installing ``requirements`` if the venv
    is missing or was made for other pins."""
    wanted = "\n".join(requirements) + "\n"
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Two benchmarks started at once must not install into the same directory together.
    # Beside the venv, not in it: a venv being replaced is deleted whole.
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = venv / MARKER
        if venv_python(venv).exists() and marker.exists() and marker.read_text() == wanted:
            return venv_python(venv)
        _remove_old_venv(venv)
        log(f"creating the venv {venv}: {' '.join(requirements)}")
        install_log = venv.with_name(venv.name + "-install.log")
        with open(install_log, "wb") as output:
            for command in (
                [sys.executable, "-m", "venv", str(venv)],
                [str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
            ):
                if subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode != 0:
                    raise VenvFailed(f"{' '.join(command)} failed; its output is in {install_log}")
        marker.write_text(wanted)
        return venv_python(venv)


def _remove_old_venv(venv: Path) -> None:
    if not venv.exists():
        return
    # Only ever delete what is recognizably a venv: --dlt-venv may name any directory.
    if not (venv / "pyvenv.cfg").exists():
        raise VenvFailed(f"{venv} exists and is not a venv: refusing to replace it")
    shutil.rmtree(venv)


def installed_versions(python: Path, packages: Sequence[str] = REPORTED_PACKAGES) -> dict[str, str]:
    """The versions the venv really holds (what the report prints), not the pins."""
    script = (
        "import json, importlib.metadata as m\n"
        f"print(json.dumps({{p: m.version(p) for p in {list(packages)!r}}}))"
    )
    result = subprocess.run([str(python), "-c", script], capture_output=True, text=True)
    if result.returncode != 0:
        raise VenvFailed(f"{python} cannot report its versions: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout)
