"""The engine imports numpy and the standard library only (tqdm/matplotlib where stated)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"torch", "triton", "jax", "tensorflow", "autograd", "transformers", "tokenizers", "safetensors"}


def imported_roots(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_no_module_under_npformer_imports_a_gpu_or_autograd_framework():
    offenders = {
        str(p.relative_to(ROOT)): sorted(set(imported_roots(p)) & FORBIDDEN) for p in (ROOT / "npformer").rglob("*.py")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders


def test_importing_every_module_loads_no_torch():
    """Also at run time: importing all of npformer leaves torch and triton unloaded."""
    code = (
        "import importlib, pkgutil, sys, npformer\n"
        "for m in pkgutil.walk_packages(npformer.__path__, 'npformer.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(k for k in ('torch', 'triton') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
