"""The study scripts in experiments/ import against the current package (they use public APIs
only; a renamed function must break here, not in the next study)."""

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_imports_and_has_a_main(script):
    spec = importlib.util.spec_from_file_location(f"experiment_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top level only: main() runs under __main__
    assert callable(module.main)


def test_no_script_reads_tscpurify_private_names():
    private = re.compile(r"from tscpurify[\w.]* import \(?[^)]*\b_\w|tscpurify(\.\w+)*\._\w")
    for script in SCRIPTS:
        assert not private.search(script.read_text()), script.name
    assert private.search("from tscpurify.defenses.tsc import _Stages")  # the check can fail
