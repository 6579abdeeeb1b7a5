"""The site builder's pieces that need no browser, and the Makefile's chromium target.

- An executed notebook is cached under a key of the script and of every Python file of
  npformer/ and kernels/: a change to any of them executes it again.
- The kernel that executes the notebooks runs on one BLAS thread.
- A notebook from a folder outside the repository gets a place to read its links from.
- ``make chromium`` never fails: without a browser and without a way to install one it says,
  in one line, that the browser tests will skip.
"""

import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.labels import ROOT


def builder():
    sys.path.insert(0, str(ROOT / "proofs" / "site"))
    try:
        import build
    finally:
        sys.path.remove(str(ROOT / "proofs" / "site"))
    return build


build = builder()


def tree(root):
    """A small repository: a notebook, two files of npformer/, one of kernels/, one elsewhere."""
    files = {
        "demos/01_x.py": "print(1)\n",
        "npformer/__init__.py": "",
        "npformer/ops/a.py": "A = 1\n",
        "kernels/b.py": "B = 2\n",
        "tests/test_c.py": "C = 3\n",
        "README.md": "# r\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "demos" / "01_x.py"


@settings(max_examples=10, deadline=None)
@given(
    changed=st.sampled_from(["demos/01_x.py", "npformer/ops/a.py", "npformer/__init__.py", "kernels/b.py"]),
    extra=st.text(min_size=1, max_size=20),
)
def test_a_change_to_the_script_or_the_code_it_runs_changes_the_cache_key(tmp_path_factory, changed, extra):
    root = tmp_path_factory.mktemp("repo")
    script = tree(root)
    before = build.notebook_key(script, root)
    assert build.notebook_key(script, root) == before  # the same files, the same key
    (root / "tests" / "test_c.py").write_text("C = 4\n")  # a file the notebook does not run
    (root / "README.md").write_text("# other\n")
    assert build.notebook_key(script, root) == before
    with (root / changed).open("a") as f:
        f.write(extra)
    assert build.notebook_key(script, root) != before


def test_a_new_or_renamed_module_changes_the_cache_key(tmp_path):
    script = tree(tmp_path)
    before = build.notebook_key(script, tmp_path)
    (tmp_path / "kernels" / "new.py").write_text("")
    added = build.notebook_key(script, tmp_path)
    assert added != before
    (tmp_path / "kernels" / "new.py").rename(tmp_path / "kernels" / "renamed.py")
    assert build.notebook_key(script, tmp_path) not in (before, added)


def test_the_cache_key_of_this_checkout_reads_npformer_and_kernels():
    script = ROOT / "tests" / "docs" / "fixtures" / "01_tiny.py"
    key = build.notebook_key(script)
    assert len(key) == 16 and int(key, 16) >= 0
    assert build.CODE_PACKAGES == ("npformer", "kernels")


def test_the_kernel_runs_on_one_blas_thread(tmp_path):
    name = build.kernel_here(tmp_path)
    spec = json.loads((tmp_path / "kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert spec["env"]["OPENBLAS_NUM_THREADS"] == "1" and spec["env"]["OMP_NUM_THREADS"] == "1"


def test_a_notebook_outside_the_repository_reads_its_links_from_demos(tmp_path):
    outside = tmp_path / "02_y.py"
    outside.write_text("")
    assert build.notebook_place(outside) == "demos/02_y.py"
    assert build.notebook_place(ROOT / "demos" / "01_x.py") == "demos/01_x.py"
    assert build.notebook_place(ROOT / "tests" / "docs" / "fixtures" / "01_tiny.py") == "tests/docs/fixtures/01_tiny.py"


def test_a_missing_mathjax_names_both_extras():
    text = (ROOT / "proofs" / "site" / "build.py").read_text()
    assert "pip install -e '.[test,docs]'" in text and "pip install -e '.[docs]')" not in text
    assert {"tex-chtml.js", "a11y", "ui"} <= set(build.MATHJAX_PARTS)  # the menu and the assistive MathML


# --------------------------------------------------------------------------- make chromium

MAKE = shutil.which("make")
FAIL = "#!/bin/sh\necho called >> {log}\nexit {status}\n"


def make_chromium(tmp_path, present=(), apt_status=100):
    """``make chromium`` on a PATH holding only stand-ins: ``present`` browsers, and an apt-get and sudo that fail."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name, status in [("apt-get", apt_status), ("sudo", apt_status)] + [(p, 0) for p in present]:
        (bin_dir / name).write_text(FAIL.format(log=log, status=status))
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    run = subprocess.run([MAKE, "-s", "-C", str(ROOT), "chromium"], env=env, capture_output=True, text=True, timeout=60)
    return run, (log.read_text().count("called") if log.exists() else 0)


@pytest.mark.skipif(MAKE is None, reason="needs make")
def test_make_chromium_does_not_fail_when_it_cannot_install(tmp_path):
    run, calls = make_chromium(tmp_path)
    assert run.returncode == 0, run.stderr
    assert calls >= 1  # it tried
    said = [line for line in run.stdout.splitlines() if "browser tests" in line]
    assert len(said) == 1 and "skip" in said[0], run.stdout


@pytest.mark.skipif(MAKE is None, reason="needs make")
@pytest.mark.parametrize("browser", ["chromium", "chromium-browser"])
def test_make_chromium_accepts_either_name(tmp_path, browser):
    run, calls = make_chromium(tmp_path, present=[browser])
    assert run.returncode == 0, run.stderr
    assert calls == 0 and "skip" not in run.stdout  # nothing to install
