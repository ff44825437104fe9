"""The README's permissions table says what the code's table says."""

from __future__ import annotations

import re

from accord_operator.permissions import CONTROLLER
from tests.support.cluster import REPO


def test_readme_table_is_the_code_table() -> None:
    text = (REPO / "README.md").read_text()
    table = re.search(
        r"<!-- permissions:controller -->\n(.*?)<!-- /permissions:controller -->", text, re.S
    )
    assert table is not None
    rows: dict[tuple[str, str], frozenset[str]] = {}
    for line in table.group(1).splitlines()[2:]:
        group, resources, verbs, _why = (c.strip() for c in line.strip("|").split("|"))
        for resource in resources.split(", "):
            key = ("" if group == "(core)" else group, resource)
            rows[key] = frozenset(v.strip() for v in verbs.split(","))
    assert rows == CONTROLLER
