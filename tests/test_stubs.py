"""The .pyi must match the compiled module (mypy's stubtest)."""

import os
import subprocess
import sys


def test_stubtest_passes():
    here = os.path.dirname(__file__)
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "dro_core", "--allowlist", os.path.join(here, "stubtest_allowlist.txt")],
        capture_output=True,
        text=True,
        cwd=here,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_stub_and_marker_are_installed():
    import dro_core

    d = os.path.dirname(dro_core.__file__)
    assert os.path.exists(os.path.join(d, "__init__.pyi"))
    assert os.path.exists(os.path.join(d, "py.typed"))
