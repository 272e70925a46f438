"""The README is for users: short, and every docs link in it resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_readme_stays_a_users_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200  # detail and history go to docs/
    for linked in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / linked).exists(), linked
