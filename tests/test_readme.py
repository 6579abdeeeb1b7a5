"""README.md as written: every Python snippet runs and prints what the README says it prints;
every shell command names a make target, a subcommand and flags that exist, with values the
command accepts (checked by parsing, without running long jobs)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from npformer import gradcheck
from npformer.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


PYTHON = blocks("python")
COMMANDS = [line for block in blocks("sh") for line in block.splitlines() if line.strip()]


def test_the_readme_has_the_snippets_this_file_checks():
    assert len(PYTHON) >= 2 and len(COMMANDS) >= 8
    assert all(re.match(r"(make |\.venv/bin/python )", c) for c in COMMANDS), COMMANDS


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_snippet_runs_and_prints_what_it_says(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    expected = re.findall(r"^# output: (.*)$", code, flags=re.M)
    assert expected, "a snippet shows what it prints in '# output: ' lines"
    printed = [" ".join(line.split()) for line in proc.stdout.splitlines()]
    assert printed == [" ".join(line.split()) for line in expected], proc.stdout


def command_words(line):
    return shlex.split(line, comments=True)


def parses(parser, words):
    """``words`` parse without error, unknown flag or bad value (argparse exits on any of those)."""
    try:
        args, extra = parser.parse_known_args(words)
    except SystemExit as e:
        pytest.fail(f"{parser.prog} {' '.join(words)}: exits with {e.code}")
    assert not extra, f"{parser.prog}: unknown {extra}"
    return args


@pytest.mark.parametrize("line", COMMANDS)
def test_shell_command_names_what_exists(line):
    words = command_words(line)
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M)
        assert set(words[1:]) <= set(targets), (words, targets)
    elif words[1:3] == ["-m", "npformer"]:
        command, rest = words[3], words[4:]
        if command == "gradcheck":
            assert all(w == "all" or w in gradcheck.families() for w in rest if not w.startswith("-")), rest
            return
        args = parses(build_parser()[1][command], rest)
        if command == "sample" and args.prompt is not None:  # the prompt must encode with the default run's vocabulary
            from npformer.data.corpus import default_corpus

            assert set(args.prompt) <= set(default_corpus()), args.prompt
    elif words[1] == "-m":  # another module: checked with the others below, in one process
        assert words[2] in OTHER_MODULES, words
    else:
        script = REPO / words[1]
        assert script.is_file(), script
        import importlib.util

        spec = importlib.util.spec_from_file_location(script.stem, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parses(module.parser(), words[2:])


OTHER_MODULES = {words[2]: [w.split("=")[0] for w in words[3:] if w.startswith("--")]
                 for words in map(command_words, COMMANDS) if words[1] == "-m" and words[2] != "npformer"}
HELP_OF_EACH = """
import contextlib, io, runpy, sys
for module in sys.argv[1:]:
    sys.argv[1:] = ["--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert e.code in (0, None), (module, e.code)
    print(f"=== {module}", out.getvalue().replace("\\n", " "))
"""


def test_other_modules_list_the_flags_the_readme_uses():
    """``python -m kernels.X --help`` (the test extra is installed) mentions every flag the README gives it."""
    assert OTHER_MODULES
    proc = subprocess.run([sys.executable, "-c", HELP_OF_EACH, *OTHER_MODULES], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    helps = dict(re.findall(r"^=== (\S+) (.*?)(?=^=== |\Z)", proc.stdout, flags=re.S | re.M))
    assert set(helps) == set(OTHER_MODULES)
    for module, flags in OTHER_MODULES.items():
        assert "usage:" in helps[module]
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", helps[module]), (module, flag)


def test_readme_defaults_match_the_code():
    """The figures the README states about `make run` are the TrainConfig defaults."""
    from npformer.train import TrainConfig

    cfg = TrainConfig()
    assert f"trained for {cfg.steps} steps of {cfg.batch_size} × {cfg.block_size}" in " ".join(README.split())
    assert f"a sample every {cfg.eval_interval} steps" in " ".join(README.split())
    assert f"{cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.d_model}, context {cfg.block_size}" in " ".join(
        README.split())
    n_evals = cfg.steps // cfg.eval_interval
    words = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 8: "eight"}
    assert f"plus {words[n_evals]} validations" in " ".join(README.split())
