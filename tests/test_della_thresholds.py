"""DELLA's decide kernel computes the keep threshold of a rank where the rest of the ranking reads a
table: a C++ check (tests/cpp/della_thresholds.cpp) compares the two for every rank of 540 row
lengths, densities and epsilons, with the scalar, AVX2 and AVX-512 lanes the CPU can run."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-std=c++17", "-O2", "-mavx512f", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]  # as setup.py builds


def _has_avx512() -> bool:
    try:
        return " avx512f " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("g++") is None or not _has_avx512(), reason="needs g++ and an AVX-512 CPU")
def test_computed_rank_thresholds_equal_the_table(tmp_path):
    binary = tmp_path / "della_thresholds"
    source = ROOT / "tests" / "cpp" / "della_thresholds.cpp"
    subprocess.run(["g++", *FLAGS, f"-I{ROOT / 'csrc'}", str(source), "-o", str(binary)], check=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(": 0 mismatches") == 3, run.stdout
