"""A wheel of tagml (not an editable install) runs the demo from an empty directory.

The wheel is built from this checkout and installed into a fresh virtualenv with `--no-deps`; the
dependencies come from the test's own environment through a `.pth` line, because downloading the
whole stack again would only test PyPI. What this proves is tagml's side: every module, the shipped
catalog and the Dagster definitions load from site-packages, nothing resolves through the source
tree or the working directory, and no generic top-level name (`features`, `training`, …) is installed.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC_NAMES = ("features", "training", "scoring", "monitoring", "orchestration", "tags")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # setuptools builds in the source directory (build/, *.egg-info): build from a copy of the tracked files
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(source)],
        check=True,
        cwd=out,
    )
    (found,) = out.glob("tagml-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin directory."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True)
    # the dependencies of this environment, after the venv's own site-packages (so the wheel's tagml wins)
    dependencies = [p for p in sys.path if p.endswith("site-packages")]
    (Path(purelib.stdout.strip()) / "zz-dependencies.pth").write_text("\n".join(dependencies) + "\n")
    return venv / "bin"


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAGML_", "PYTHON", "DAGSTER_HOME", "MLFLOW_"))}
    env.update(HOME=str(home.parent), TAGML_HOME=str(home))
    return env


def test_the_wheel_holds_the_namespace_the_catalog_and_no_generic_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "tagml/tags/catalog.yaml" in names
    assert "tagml/orchestration/definitions.py" in names and "tagml/features/raw.py" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"tagml"}, f"top-level names installed besides tagml: {sorted(tops - {'tagml'})}"
    assert not any(n.startswith(f"{generic}/") for generic in GENERIC_NAMES for n in names)


def test_every_module_imports_from_site_packages(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    script = (
        "import importlib, pkgutil, sys, tagml\n"
        "root = tagml.__path__[0]\n"
        "assert 'site-packages' in root, root\n"
        # __main__ modules run the command when imported: their package is imported instead
        "names = [m.name for m in pkgutil.walk_packages(tagml.__path__, 'tagml.') if not m.name.endswith('.__main__')]\n"
        "for name in names: importlib.import_module(name)\n"
        f"leaked = [m for m in sys.modules if m.split('.')[0] in {GENERIC_NAMES!r}]\n"
        "assert not leaked, leaked\n"
        "from tagml.core.settings import DEFAULT_CATALOG\n"
        "assert DEFAULT_CATALOG.is_file() and str(DEFAULT_CATALOG).startswith(root), DEFAULT_CATALOG\n"
        "print(len(names))\n"
    )
    proc = subprocess.run([str(installed / "python"), "-c", script], check=False, cwd=empty, env=_clean_env(tmp_path / "home"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip()) > 30


def test_the_installed_demo_runs_end_to_end_from_an_empty_directory(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    home = tmp_path / "home"
    proc = subprocess.run(
        [str(installed / "tagml"), "demo", "--customers", "3000"], check=False, cwd=empty, env=_clean_env(home), capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert list(empty.iterdir()) == []  # everything went to TAGML_HOME, nothing beside the user
    assert list((home / "warehouse" / "customer_tags").glob("as_of=*/data.parquet"))


def test_the_installed_code_location_that_tagml_ui_serves_loads(installed, tmp_path):
    from tagml.cli.uis import DAGSTER_CODE_LOCATION

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**_clean_env(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    (tmp_path / "dagster").mkdir()
    proc = subprocess.run(
        [str(installed / "python"), "-m", "dagster", "definitions", "validate", *DAGSTER_CODE_LOCATION],
        check=False,
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
