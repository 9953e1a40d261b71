"""LoRA extraction: ``modelfusion extract-lora`` beside ``mergekit-extract-lora`` on a generated Llama pair.

    python benchmarks/extract_lora.py                       # 4 layers of 2048/5632 (TinyLlama's width), rank 32
    python benchmarks/extract_lora.py --layers 1 --rank 8   # a quick run

Each tool runs in a fresh process on the same base and tune (bf16, HF format); reported: seconds
(whole process), peak RSS, and the relative error ‖W_tuned − W_base − B·A‖_F / ‖W_tuned − W_base‖_F of
one MLP matrix after applying each adapter with our ``model+adapter`` reader. Writes JSON (default
benchmarks/results/extract-lora-cpu.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from modelfusion.demos.streaming import make_llama_family
from modelfusion.io import Checkpoint
from modelfusion.io.lora import open_model
from roofline import header

RSS = "import resource, sys; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)"


def timed(command: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of ``command`` in a fresh process."""
    wrapper = f"import subprocess, sys; subprocess.run({command!r}, check=True); {RSS}"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return seconds, int(run.stderr.strip().splitlines()[-1])


def relative_error(base: Path, tuned: Path, adapter: Path, name: str) -> float:
    applied = open_model(Path(f"{base}+{adapter}")).read(name).double()
    want, plain = Checkpoint(tuned).read(name).double(), Checkpoint(base).read(name).double()
    return float((applied - want).norm() / (want - plain).norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "extract-lora-cpu.json")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fk-extract-"))
    try:
        shape = dict(hidden=2048, layers=args.layers, intermediate=5632, vocab=32000, kv_heads=4, heads=32)
        base, tuned = make_llama_family(root / "models", 1, torch.bfloat16, **shape)
        name = "model.layers.0.mlp.up_proj.weight"
        ours_cmd = [sys.executable, "-m", "modelfusion", "extract-lora", str(base), str(tuned), str(root / "ours")]
        rows = []
        seconds, rss = timed([*ours_cmd, "--rank", str(args.rank), "--quiet"])
        rows.append({"tool": "modelfusion extract-lora", "seconds": seconds, "peak_rss_mib": rss / 2**20,
                     "relative_error": relative_error(base, tuned, root / "ours", name)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        mergekit = shutil.which("mergekit-extract-lora")
        if mergekit and not args.skip_mergekit:
            cmd = [mergekit, "--model", str(tuned), "--base-model", str(base), "--out-path", str(root / "theirs")]
            seconds, rss = timed([*cmd, "--max-rank", str(args.rank)])
            rows.append({"tool": "mergekit-extract-lora 0.1.5", "seconds": seconds, "peak_rss_mib": rss / 2**20,
                         "relative_error": relative_error(base, tuned, root / "theirs", name)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        result = {
            **header("extract-lora"),
            "layers": args.layers,
            "rank": args.rank,
            "params": sum(t.nbytes // 2 for t in Checkpoint(base).tensors.values()),
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
