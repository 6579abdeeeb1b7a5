r"""Keep proofs/, the code and the tests in step.

- A label is *defined* where a document in proofs/ tags an equation with it: ``\tag*{(LN.4)}``.
- Every label listed in a document's "## Results" section has a test marked
  ``@pytest.mark.derivation("LN.4")``.
- Every label cited in code or tests (every label on a ``#`` comment, ``# (LN.4), (LN.5)``),
  named by a test marker, or mentioned anywhere in proofs/ is defined, and defined once.
- Every test a Results table names in its "checked by" column exists and carries
  that row's marker.
- The documents use only LaTeX that GitHub renders (no ``\{``, ``\,`` and the like).

The scan itself lives in ``tests/labels.py``; the documentation site links labels, code and
tests from the same scan.
"""

import re

from tests.labels import (
    COMMENT,
    LABEL,
    MENTION,
    ROOT,
    comment_labels,
    defined_labels,
    documents,
    marked_labels,
    markers,
    markers_by_test,
    results_section,
    scan,
)


def test_every_document_has_results():
    docs = documents()
    assert docs, "proofs/ holds no derivation documents"
    for doc in docs:
        results = MENTION.findall(results_section(doc.read_text()))
        assert results, f"{doc.name}: no labels in its '## Results' section"


def test_labels_defined_once():
    twice = {label: n for label, n in defined_labels().items() if n > 1}
    assert not twice, f"labels defined more than once: {twice}"


def test_every_result_has_a_test():
    marked = marked_labels()
    missing = {
        doc.name: sorted(set(MENTION.findall(results_section(doc.read_text()))) - marked) for doc in documents()
    }
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"result labels with no @pytest.mark.derivation test: {missing}"


def test_code_cites_only_defined_labels():
    defined = defined_labels()
    found = scan()
    undefined = {
        c.label: f"{c.path}:{c.line}" for c in found.citations + found.test_citations if c.label not in defined
    }
    assert not undefined, f"code cites labels no document defines: {undefined}"


def test_markers_name_defined_labels():
    defined = defined_labels()
    assert not marked_labels() - set(defined), f"tests name undefined labels: {sorted(marked_labels() - set(defined))}"


def test_documents_mention_only_defined_labels():
    defined = defined_labels()
    for doc in documents():
        stray = set(MENTION.findall(doc.read_text())) - set(defined)
        assert not stray, f"{doc.name} mentions undefined labels {sorted(stray)}"


def test_index_lists_every_document():
    index = (ROOT / "proofs" / "README.md").read_text()
    missing = [doc.name for doc in documents() if f"({doc.name})" not in index]
    assert not missing, f"proofs/README.md does not link {missing}"


def test_derivation_marker_is_declared(pytestconfig):
    """``--strict-markers`` is on and the marker is declared, so a misspelt marker fails collection."""
    assert "--strict-markers" in pytestconfig.getini("addopts")
    assert any(m.startswith("derivation(") for m in pytestconfig.getini("markers"))


def test_every_label_on_a_comment_line_is_read():
    """The citation reader sees the second and third label of one comment, not only the first."""
    text = "y = f(x)  # (LN.4), (LN.5) and (ACT.13)\n"
    assert [label for c in COMMENT.findall(text) for label in MENTION.findall(c)] == ["LN.4", "LN.5", "ACT.13"]
    assert comment_labels("x = '(LN.1)'  # (LN.2)") == ["LN.2"]  # a label outside the comment is not a citation


def test_markers_are_read_from_decorators_only(tmp_path):
    """A marker quoted in a docstring is not a marker; one on a class counts for each test in it."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        '"""Mark it with @pytest.mark.derivation("LN.4")."""\n'
        "import pytest\n"
        "@pytest.mark.derivation(\"LN.5\")\n"
        "def test_a():\n"
        "    pass\n"
        "@pytest.mark.derivation(\"SM.2\")\n"
        "class TestB:\n"
        "    @pytest.mark.derivation(\"SM.3\")\n"
        "    def test_c(self):\n"
        "        pass\n"
    )
    found = sorted((m.label, m.line, m.test) for m in markers(tmp_path))
    assert found == [("LN.5", 3, "test_a"), ("SM.2", 6, "TestB::test_c"), ("SM.3", 8, "TestB::test_c")]
    assert marked_labels(tmp_path) == {"LN.5", "SM.2", "SM.3"}


def test_markers():
    """Map each test function name to the derivation labels its decorators carry."""
    return markers_by_test()


test_markers.__test__ = False  # a helper, not a test


ROW = re.compile(r"^\|((?:\s*\(" + LABEL + r"\),?)+)\s*\|.*\|([^|]*)\|\s*$", re.M)


def test_checked_by_names_tests_that_carry_the_marker():
    """Each test a row names carries one of the row's labels, and each label is carried by one of them."""
    carried = test_markers()
    wrong, rows = [], 0
    for doc in documents():
        section = results_section(doc.read_text())
        for labels_cell, checked_by in ROW.findall(section):
            rows += 1
            labels = set(MENTION.findall(labels_cell))
            names = re.findall(r"`(test_\w+)`", checked_by)
            where = f"{doc.name} ({', '.join(sorted(labels))})"
            if not names:
                wrong.append(f"{where}: the 'checked by' cell names no test")
            for name in names:
                if name not in carried:
                    wrong.append(f"{where}: no test named {name}")
                elif not labels & carried[name]:
                    wrong.append(f"{where}: {name} carries none of these labels")
            for label in labels:
                if not any(label in carried.get(name, ()) for name in names):
                    wrong.append(f"{where}: no test named here carries ({label})")
        table_rows = [line for line in section.splitlines() if line.startswith("|") and MENTION.search(line)]
        assert len(table_rows) == len(ROW.findall(section)), f"{doc.name}: a Results row the reader cannot parse"
    assert rows > 0 and not wrong, "\n".join(wrong)


# LaTeX that GitHub's math renderer drops or shows as punctuation.
UNRENDERED = re.compile(r"\\[{},;!]")


def test_documents_render_on_github():
    bad = {doc.name: sorted(set(UNRENDERED.findall(doc.read_text()))) for doc in documents()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"use \\lbrace/\\rbrace and no \\, \\; \\! spacing: {bad}"
