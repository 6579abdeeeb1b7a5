"""The notebooks in demos/ run as plain scripts, and each is a valid Jupytext percent script.

Every ``demos/NN_*.py`` is run in its own process from the repository root, on one BLAS
thread (the notebooks promise well under a minute on one core), and must exit with status
0 and end with its marker line ``NN_name: all checks passed``, printed only after every
assertion in it has held. A new notebook is picked up by the glob. A notebook that imports
an optional dependency of the test extra (torch, triton, transformers) is skipped when that
dependency is missing; any other failed import is a failure. Each run's wall and CPU time
is printed (on a shared machine the CPU time is the one to compare).

The format: the first cell is a markdown cell opening with a ``# Title``; every cell header
is ``# %%`` or ``# %% [markdown]``; every line of a markdown cell is a comment; every
repository path a markdown link points to exists, and every equation label the notebook
names is defined in ``proofs/``. Where jupytext is installed, it reads the same cells.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.labels import DEFINITION, MENTION

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "demos").glob("[0-9][0-9]_*.py"))
IDS = [p.stem for p in NOTEBOOKS]
OPTIONAL = ("torch", "triton", "transformers")  # the test extra: a notebook needing one is skipped without it
TIMEOUT_S = 240  # a hung notebook fails instead of stalling the suite
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}

HEADER = re.compile(r"^# %%")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def marker(path: Path) -> str:
    return f"{path.stem}: all checks passed"


def imported_modules(path: Path) -> set:
    """Top-level names of every module the script imports (anywhere in it)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def run_notebook(path: Path):
    """Run ``path`` as a script from the repository root: (completed process, wall seconds, CPU seconds)."""
    # the repository first on the path, as for the tests themselves (not some installed copy elsewhere)
    path_entries = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": os.pathsep.join(path_entries)}
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return run, time.perf_counter() - start, used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime


def run_problems(path: Path, run) -> list:
    """What is wrong with a finished run of ``path`` (an empty list when nothing is)."""
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    problems = []
    if run.returncode != 0:
        problems.append(f"exit status {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    if not lines or lines[-1] != marker(path):
        problems.append(f"last line {lines[-1:]!r}, expected {marker(path)!r}")
    if "Traceback" in run.stderr:
        problems.append(f"a traceback on stderr:\n{run.stderr[-3000:]}")
    return problems


def cells(text: str) -> list:
    """(header line, body lines) of each cell; lines before the first header form a cell with header None."""
    out = [(None, [])]
    for line in text.splitlines():
        if HEADER.match(line):
            out.append((line, []))
        else:
            out[-1][1].append(line)
    return out


def format_problems(text: str, stem: str) -> list:
    """What makes ``text`` not a notebook of this house's percent format (an empty list when nothing does)."""
    found, problems = cells(text), []
    if any(line.strip() for line in found[0][1]):
        problems.append("text before the first '# %%' cell")
    if len(found) < 2 or found[1][0] != "# %% [markdown]":
        problems.append("the first cell is not a markdown cell")
    else:
        title = next((line for line in found[1][1] if line.strip()), "")
        if not re.fullmatch(r"# # \S.*", title):
            problems.append(f"the first cell does not open with a '# Title': {title!r}")
    for header, body in found[1:]:
        if header not in ("# %%", "# %% [markdown]"):
            problems.append(f"cell header {header!r}")
        elif header == "# %% [markdown]":
            prose = [line for line in body if line.strip()]
            if not prose:
                problems.append("an empty markdown cell")
            bad = [line for line in prose if not (line == "#" or line.startswith("# "))]
            if bad:
                problems.append(f"markdown lines that are not comments: {bad[:3]}")
        elif not any(line.strip() for line in body):
            problems.append("an empty code cell")
    if len(found) < 2 or f"{stem}: all checks passed" not in "\n".join(found[-1][1]):
        problems.append("the last cell does not print the marker line")
    try:
        compile(text, stem, "exec")
    except SyntaxError as err:
        problems.append(f"not valid Python: {err}")
    return problems


# -- the notebooks --------------------------------------------------------------------------------------
def test_the_notebooks_are_found():
    names = [p.name for p in NOTEBOOKS]
    assert len(names) >= 8, names
    assert len({n[:2] for n in names}) == len(names), f"two notebooks share a number: {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_as_a_script(path, capsys):
    missing = sorted(m for m in imported_modules(path) & set(OPTIONAL) if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)} (the test extra)")
    run, wall, cpu = run_notebook(path.relative_to(ROOT))
    with capsys.disabled():  # shown with or without -s: the run times are part of the report
        print(f"\n{path.name}: {wall:.1f} s wall, {cpu:.1f} s CPU (exit status {run.returncode})")
    problems = run_problems(path, run)
    assert not problems, f"{path.name}: " + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_a_percent_script(path):
    problems = format_problems(path.read_text(), path.stem)
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_jupytext_reads_the_same_cells(path):
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(path)
    ours = [("markdown" if h == "# %% [markdown]" else "code") for h, _ in cells(path.read_text())[1:]]
    assert [c.cell_type for c in nb.cells] == ours
    assert nb.cells[0].source.splitlines()[0].startswith("# ")  # the title, as the notebook shows it


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_links_and_labels_exist(path):
    text = path.read_text()
    targets = [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    missing = [t for t in targets if not (path.parent / t.partition("#")[0]).exists()]
    assert not missing, f"{path.name}: links to paths that do not exist: {missing}"
    defined = {label for doc in (ROOT / "proofs").glob("*.md") for label in DEFINITION.findall(doc.read_text())}
    undefined = sorted(set(MENTION.findall(text)) - defined)
    assert not undefined, f"{path.name}: names labels no document in proofs/ defines: {undefined}"


# -- the checks themselves catch what they are for --------------------------------------------------------
GOOD = """# %% [markdown]
# # A title
#
# Some prose.

# %%
x = 1 + 1
assert x == 2

# %%
print("09_demo: all checks passed")
"""


@pytest.mark.parametrize("ok", [True, False])
def test_a_failed_assertion_fails_the_run(ok, tmp_path):
    path = tmp_path / "09_demo.py"
    path.write_text(GOOD if ok else GOOD.replace("assert x == 2", "assert x == 3, 'wrong sum'"))
    run, _, _ = run_notebook(path)
    problems = run_problems(path, run)
    assert (problems == []) == ok
    if not ok:
        assert "exit status 1" in problems[0] and "wrong sum" in problems[0]
        assert any("last line" in p for p in problems)  # the marker never printed


@pytest.mark.parametrize("change, expected", [
    (lambda t: "import os\n" + t, "text before the first"),
    (lambda t: t.replace("# %% [markdown]\n# # A title", "# %%\n# # A title", 1), "first cell is not a markdown"),
    (lambda t: t.replace("# # A title", "# A title"), "does not open with a '# Title'"),
    (lambda t: t.replace("# %%\nx = 1", "# %% tags\nx = 1"), "cell header"),
    (lambda t: t.replace("# Some prose.", "Some prose."), "not comments"),
    (lambda t: t.replace("09_demo: all", "09_other: all"), "marker line"),
    (lambda t: t.replace("x = 1 + 1", "x = (1 +"), "not valid Python"),
])
def test_format_problems_are_found(change, expected):
    assert format_problems(GOOD, "09_demo") == []
    problems = format_problems(change(GOOD), "09_demo")
    assert any(expected in p for p in problems), problems
