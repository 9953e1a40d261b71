"""The whole GPU check in one command, for the few minutes a GPU is lent (under 8 minutes on one):

1. every op's tests on CUDA tensors for the ``triton`` and ``cuda`` backends against the reference
   (``pytest -k "triton or cuda"`` per op file; the tests put their tensors on the backend's device);
2. the roofline of each averaging op against the GPU's measured copy bandwidth
   (``benchmarks/roofline.py --device cuda``);
3. a pipeline merge with ``--device cuda`` on a small generated Llama family, compared tensor by
   tensor with the same merge on the CPU.

Writes one JSON (default ``benchmarks/results/gpu-check-<device>.json``) with the device name and
each step's outcome; a step that fails or runs out of its time is recorded and the next one runs.

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --dry-run       # here: the commands it would run
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OP_TESTS = [
    "test_weighted_sum.py",
    "test_task_arithmetic.py",
    "test_fisher_merge.py",
    "test_sparse_merge.py",
    "test_magnitude_prune.py",
    "test_global_threshold.py",
    "test_slerp.py",
    "test_permute.py",
    "test_sinkhorn.py",
    "test_linear_assignment.py",
    "test_gram.py",
    "test_ram_merge.py",
    "test_magmax.py",
]
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors)")

MERGE = """
import json, sys, torch
from pathlib import Path
from modelfusion.demos.streaming import make_llama_family, recipe_text
from modelfusion.io import Checkpoint
from modelfusion.pipeline import merge
root, device = Path(sys.argv[1]), sys.argv[2]
paths = make_llama_family(root / "models", 2, torch.bfloat16, hidden=512, layers=4, intermediate=1408, vocab=4096,
                          kv_heads=2, heads=8)
rows = []
for method in ("linear", "ties", "dare_ties", "slerp", "della"):
    recipe = root / f"{method}.yaml"
    recipe.write_text(recipe_text(method, paths, dtype="bfloat16"))
    outs = {}
    for tag, where in (("reference", "cpu"), ("checked", device)):
        stats = merge(recipe, root / f"{method}-{tag}", device=where, progress=False)
        outs[tag] = Checkpoint(root / f"{method}-{tag}")
    cpu, gpu = outs["reference"], outs["checked"]
    worst = max(float((cpu.read(k).float() - gpu.read(k).float()).abs().max()) for k in cpu.tensors)
    rows.append({"method": method, "max_abs_difference": worst, "seconds_on_device": stats.seconds})
print(json.dumps(rows))
"""


def run(cmd: list[str], timeout: float) -> tuple[int | str, str, float]:
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", out, time.perf_counter() - start


def tests_step(budget: float, dry: bool) -> list[dict]:
    rows = []
    per_file = budget / len(OP_TESTS)
    for name in OP_TESTS:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/{name}", "-k", "triton or cuda"]
        if dry:
            print(" ".join(cmd))
            continue
        code, out, seconds = run(cmd, per_file)
        counts = {kind.rstrip("s"): int(n) for n, kind in SUMMARY.findall(out.splitlines()[-1] if out else "")}
        failures = [line for line in out.splitlines() if line.startswith("FAILED")][:20]
        rows.append({"file": name, "exit": code, "seconds": round(seconds, 1), **counts, "failures": failures})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--pipeline-only", action="store_true", help="step 3 alone (with --device cpu: a self-test)")
    args = parser.parse_args()
    if args.dry_run:
        tests_step(0, dry=True)
        print(f"{sys.executable} benchmarks/roofline.py --device {args.device} --numel {1 << 26} --json <tmp>")
        print(f"{sys.executable} -c <the pipeline merge on cpu and {args.device}>")
        return
    import torch

    if args.pipeline_only:
        with tempfile.TemporaryDirectory() as tmp:
            code, out, _ = run([sys.executable, "-c", MERGE, tmp, args.device], 600)
            print(out.strip().splitlines()[-1] if code == 0 else out[-3000:])
            sys.exit(0 if code == 0 else 1)
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no GPU here (use --dry-run to list the commands)")
    sys.path.insert(0, str(HERE))
    from roofline import header

    report = {**header("gpu_check", args.device), "steps": {}}
    report["steps"]["tests"] = tests_step(240, dry=False)
    with tempfile.TemporaryDirectory() as tmp:
        roof = Path(tmp) / "roofline.json"
        cmd = [sys.executable, "benchmarks/roofline.py", "--device", args.device, "--numel", str(1 << 26)]
        code, out, seconds = run([*cmd, "--json", str(roof)], 120)
        report["steps"]["roofline"] = {"exit": code, "seconds": round(seconds, 1)}
        if roof.exists():
            report["steps"]["roofline"]["results"] = json.loads(roof.read_text())
        else:
            report["steps"]["roofline"]["tail"] = out[-2000:]
        code, out, seconds = run([sys.executable, "-c", MERGE, tmp, args.device], 120)
        merge_step = {"exit": code, "seconds": round(seconds, 1)}
        try:
            merge_step["rows"] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            merge_step["tail"] = out[-2000:]
        report["steps"]["pipeline"] = merge_step
    name = re.sub(r"[^a-z0-9]+", "-", report["machine"].lower()).strip("-")
    path = args.json or HERE / "results" / f"gpu-check-{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
