r"""Keep proofs/, the code and the tests in step.

- A label is *defined* where a document in proofs/ tags an equation with it: ``\tag*{(LN.4)}``.
- Every label listed in a document's "## Results" section has a test marked
  ``@pytest.mark.derivation("LN.4")``.
- Every label cited in code (every label on a ``#`` comment, ``# (LN.4), (LN.5)``),
  named by a test marker, or mentioned anywhere in proofs/ is defined, and defined once.
- Every test a Results table names in its "checked by" column exists and carries
  that row's marker.
- The documents use only LaTeX that GitHub renders (no ``\{``, ``\,`` and the like).
"""

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABEL = r"[A-Z][A-Za-z0-9]*\.[0-9]+[a-z]?"
DEFINITION = re.compile(r"\\tag\*\{\((" + LABEL + r")\)\}")
MENTION = re.compile(r"\((" + LABEL + r")\)")
COMMENT = re.compile(r"#(.*)$", re.M)
MARKER = re.compile(r"derivation\(\s*\"(" + LABEL + r")\"")


def documents():
    return sorted(p for p in (ROOT / "proofs").glob("*.md") if p.name != "README.md")


def results_section(text):
    match = re.search(r"^## Results\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


def defined_labels():
    return Counter(label for doc in documents() for label in DEFINITION.findall(doc.read_text()))


def marked_labels():
    return {label for p in (ROOT / "tests").rglob("*.py") for label in MARKER.findall(p.read_text())}


def cited_labels():
    cited = {}
    for package in ("npformer", "kernels"):
        for p in (ROOT / package).rglob("*.py"):
            for comment in COMMENT.findall(p.read_text()):
                for label in MENTION.findall(comment):
                    cited.setdefault(label, p.relative_to(ROOT))
    return cited


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
    undefined = {label: str(where) for label, where in cited_labels().items() if label not in defined}
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


def test_markers():
    """Map each test function name to the derivation labels its decorators carry."""
    found = {}
    for p in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                labels = found.setdefault(node.name, set())
                for dec in node.decorator_list:
                    if isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith("mark.derivation"):
                        labels.update(a.value for a in dec.args if isinstance(a, ast.Constant))
    return found


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
