"""The .pyi must match the compiled module (mypy's stubtest)."""

import os
import subprocess
import sys


def test_stubtest_passes():
    here = os.path.dirname(__file__)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "dro_core",
            "--allowlist",
            os.path.join(here, "stubtest_allowlist.txt"),
        ],
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


def test_stub_types_a_typical_use(tmp_path):
    # mypy, reading the installed stub, accepts ordinary use and rejects a misuse
    good = tmp_path / "good.py"
    good.write_text(
        "import numpy as np\n"
        "import dro_core\n"
        "loss: dro_core.Loss = dro_core.Loss.softplus(4, -3.0, 3.0)\n"
        "res: dro_core.Solution = dro_core.solve(np.zeros(3), 0.1, 2, loss=loss, support=(-3.0, 3.0), threads=1)\n"
        "v: float = res.value + res.dual_gap + float(res.lam[0])\n"
        "lo, hi = res.support\n"
        "k: int = dro_core.CHUNK\n"
        "s: str = dro_core.__version__\n"
        "c: bool = loss.is_convex\n"
        "w = loss(np.asarray(res.loc[:, 0]))\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text("import dro_core\nx: str = dro_core.solve([0.5], 0.1).value\n")
    cmd = [sys.executable, "-m", "mypy", "--no-incremental", "--ignore-missing-imports", "--no-error-summary"]
    r = subprocess.run(cmd + [str(good)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "incompatible types" in r.stdout.lower(), r.stdout + r.stderr
