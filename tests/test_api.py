"""The public API names listed in selfclassifier_core.__all__ resolve, and stay streamlit-free."""
import subprocess
import sys

import pytest

import selfclassifier_core as sc


def test_every_public_name_resolves():
    missing = [n for n in sc.__all__ if n != "__version__" and getattr(sc, n, None) is None]
    assert missing == []


@pytest.mark.slow  # a fresh interpreter
def test_core_never_imports_streamlit():
    code = (
        "import importlib, pkgutil, sys\n"
        "import selfclassifier_core as sc\n"
        "for m in pkgutil.walk_packages(sc.__path__, 'selfclassifier_core.'):\n"
        "    if m.name.endswith('backbones_lite'):\n"
        "        continue\n"
        "    importlib.import_module(m.name)\n"
        "assert 'streamlit' not in sys.modules, 'core imported streamlit'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
