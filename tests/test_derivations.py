"""Keep proofs/, the code and the tests in step.

- A label is *defined* where a document in proofs/ tags an equation with it: ``\\tag*{(LN.4)}``.
- Every label listed in a document's "## Results" section has a test marked
  ``@pytest.mark.derivation("LN.4")``.
- Every label cited in code (``# (LN.4)``), named by a test marker, or mentioned
  anywhere in proofs/ is defined, and defined once.
"""

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABEL = r"[A-Z][A-Za-z0-9]*\.[0-9]+[a-z]?"
DEFINITION = re.compile(r"\\tag\*\{\((" + LABEL + r")\)\}")
MENTION = re.compile(r"\((" + LABEL + r")\)")
CITATION = re.compile(r"#.*?\((" + LABEL + r")\)")
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
            for label in CITATION.findall(p.read_text()):
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
