"""The label scan (tests/labels.py) that the meta-test and the site share."""

import re

from hypothesis import given
from hypothesis import strategies as st

from tests.labels import DEFINITION, LABEL, ROOT, Scan, comment_labels, markers, scan

labels = st.from_regex(re.compile(r"\A" + LABEL + r"\Z"))


@given(st.lists(labels, min_size=1, max_size=5), st.lists(labels, max_size=3), st.sampled_from([", ", " and ", " "]))
def test_every_label_on_a_comment_is_read_in_order_and_none_before_it(cited, decoys, sep):
    code = "y = f(" + ", ".join(f"'({d})'" for d in decoys) + ")"
    line = code + "  # " + sep.join(f"({label})" for label in cited)
    assert comment_labels(line) == cited


@given(st.lists(labels, min_size=1, max_size=4, unique=True))
def test_a_definition_is_a_starred_tag(tagged):
    text = "\n\n".join(f"$$x_{i} = y \\tag*{{({label})}}$$" for i, label in enumerate(tagged))
    assert DEFINITION.findall(text) == tagged
    assert DEFINITION.findall(text.replace("\\tag*", "\\tag")) == []  # an unstarred tag is not a definition


def test_the_scan_of_this_checkout_is_consistent():
    found = scan()
    assert isinstance(found, Scan)
    assert len(found.definitions) > 200 and len(found.citations) > 300 and len(found.markers) > 200
    for m in found.markers:
        line = (ROOT / m.path).read_text().splitlines()[m.line - 1]
        assert "derivation" in line and m.label in line, m  # the marker's line is the decorator that names it
    for c in found.citations[:: max(1, len(found.citations) // 50)]:
        assert c.label in (ROOT / c.path).read_text().splitlines()[c.line - 1].split("#", 1)[1], c
    assert all(m.test.rsplit("::", 1)[-1].startswith("test_") for m in markers())
