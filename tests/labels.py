r"""Where every equation label lives: defined in proofs/, cited in code, carried by tests.

One scan, read by the meta-test (``tests/test_derivations.py``) and by the documentation
site (``proofs/site/build.py``), so the two cannot disagree.

- A label is *defined* where a document in proofs/ tags an equation with it: ``\tag*{(LN.4)}``.
- A label is *cited* on a ``#`` comment of a Python file: ``dxhat = dy * gamma  # (LN.8)``;
  every label on the comment counts (``# (LN.4), (LN.5)``).
- A label is *carried* by a test whose decorator is ``@pytest.mark.derivation("LN.4")``
  (read from the syntax tree, so a marker quoted in a docstring is not one).
"""

import ast
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABEL = r"[A-Z][A-Za-z0-9]*\.[0-9]+[a-z]?"
DEFINITION = re.compile(r"\\tag\*\{\((" + LABEL + r")\)\}")
MENTION = re.compile(r"\((" + LABEL + r")\)")
COMMENT = re.compile(r"#(.*)$", re.M)
CODE_PACKAGES = ("npformer", "kernels")
# files whose comments quote labels as examples of the syntax, not as citations
EXAMPLES = ("tests/labels.py", "tests/test_derivations.py")


@dataclass(frozen=True)
class Definition:
    """``label`` is tagged on line ``line`` (1-based) of ``document`` (a path relative to the root)."""

    label: str
    document: Path
    line: int


@dataclass(frozen=True)
class Citation:
    """A ``#`` comment on line ``line`` of ``path`` names ``label``; ``text`` is the whole line."""

    label: str
    path: Path
    line: int
    text: str


@dataclass(frozen=True)
class Marker:
    """Test ``test`` (``Class::name`` for a method) in ``path`` carries ``label``; ``line`` is the decorator's."""

    label: str
    path: Path
    line: int
    test: str


@dataclass(frozen=True)
class Scan:
    definitions: tuple
    citations: tuple  # in npformer/ and kernels/
    test_citations: tuple  # comments in tests/ (a test that evaluates an equation names it)
    markers: tuple


def documents(root=ROOT):
    return sorted(p for p in (root / "proofs").glob("*.md") if p.name != "README.md")


def results_section(text):
    match = re.search(r"^## Results\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


def definitions(root=ROOT):
    found = []
    for doc in documents(root):
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            found += [Definition(label, doc.relative_to(root), number) for label in DEFINITION.findall(line)]
    return found


def comment_labels(line):
    """Every label on the ``#`` comment of one line of Python, in order."""
    return [label for comment in COMMENT.findall(line) for label in MENTION.findall(comment)]


def python_files(root, package):
    return sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)


def citations(packages=CODE_PACKAGES, root=ROOT):
    found = []
    for package in packages:
        for p in python_files(root, package):
            if p.relative_to(root).as_posix() in EXAMPLES:
                continue
            for number, line in enumerate(p.read_text().splitlines(), 1):
                found += [Citation(label, p.relative_to(root), number, line) for label in comment_labels(line)]
    return found


def _derivation_labels(decorator):
    if isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("mark.derivation"):
        return [a.value for a in decorator.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return []


def collected_files(root=ROOT):
    """The files pytest collects (``test_*.py``)."""
    return sorted(p for p in (root / "tests").rglob("test_*.py") if "__pycache__" not in p.parts)


def collected_tests(root=ROOT):
    """Every test function, as ``(path, name, [(label, decorator line), ...])``; ``name`` is ``Class::test`` in a class.

    A marker on a test class counts for each test in it.
    """
    found = []

    def visit(body, path, prefix, inherited):
        for node in body:
            if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                own = [(label, dec.lineno) for dec in node.decorator_list for label in _derivation_labels(dec)]
                visit(node.body, path, prefix + node.name + "::", inherited + own)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                own = [(label, dec.lineno) for dec in node.decorator_list for label in _derivation_labels(dec)]
                found.append((path, prefix + node.name, inherited + own))

    for p in collected_files(root):
        visit(ast.parse(p.read_text()).body, p.relative_to(root), "", [])
    return found


def markers(root=ROOT):
    """Every ``@pytest.mark.derivation`` label on a test, with the decorator's line."""
    return [Marker(label, path, line, name) for path, name, labels in collected_tests(root) for label, line in labels]


def scan(root=ROOT):
    return Scan(
        definitions=tuple(definitions(root)),
        citations=tuple(citations(CODE_PACKAGES, root)),
        test_citations=tuple(citations(("tests",), root)),
        markers=tuple(markers(root)),
    )


def defined_labels(root=ROOT):
    """How many times each label is tagged in proofs/ (once, when all is well)."""
    return Counter(d.label for d in definitions(root))


def marked_labels(root=ROOT):
    return {m.label for m in markers(root)}


def cited_labels(root=ROOT):
    """Each label cited in npformer/ or kernels/, with the first file that cites it."""
    cited = {}
    for c in citations(CODE_PACKAGES, root):
        cited.setdefault(c.label, c.path)
    return cited


def markers_by_test(root=ROOT):
    """Each test's name (without its class) mapped to the labels its markers carry (empty for none)."""
    found = {}
    for _, name, labels in collected_tests(root):
        found.setdefault(name.rsplit("::", 1)[-1], set()).update(label for label, _ in labels)
    return found
