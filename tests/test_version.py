"""The version is declared once (tscpurify/version.py); the package metadata reads it."""

import importlib.metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

import tscpurify
from tscpurify.version import __version__


def test_version_is_declared_once_and_installed_metadata_agrees():
    pyproject = tomllib.loads((Path(tscpurify.__file__).parents[1] / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "tscpurify.version.__version__"}
    assert tscpurify.__version__ == __version__
    assert importlib.metadata.version("tscpurify") == __version__
