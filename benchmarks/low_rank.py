"""``fk.truncated_svd`` and ``fk.polar`` beside ``torch.linalg.svd`` (what FusionBench's subspace
merges and our reference call) on the matrix shapes of a CLIP ViT-B/32 and a Llama-7B layer, one
run: seconds per matrix, speedup, and the error of each against a float64 SVD (max |Δ| of U·S·Vh
for the truncation, of Q for the polar factor, relative to σ₁ and 1); the polar factor also without
its singular values (``values=False``, the subspace merges' call). Compute-bound work: no GB/s.

    python benchmarks/low_rank.py                     # ViT-B/32 shapes, batches of 8, float32
    python benchmarks/low_rank.py --shapes 4096x4096 --batch 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from roofline import header, timeit

import fusion_kernels as fk
from fusion_kernels import reference as ref

HERE = Path(__file__).parent


def _errors(x: torch.Tensor, k: int, fns: dict) -> dict:
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    exact_low = (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]
    exact_q = u @ vh
    errors = {}
    for name, (trunc, pol) in fns.items():
        tu, ts, tvh = trunc(x, k)
        low = (tu.double() * ts.double().unsqueeze(-2)) @ tvh.double()
        errors[f"{name}_truncated_error"] = float((low - exact_low).abs().max() / s[..., 0].max())
        errors[f"{name}_polar_error"] = float((pol(x)[0].double() - exact_q).abs().max())
    q_only = fk.polar(x, values=False)[0]
    errors["ours_polar_q_error"] = float((q_only.double() - exact_q).abs().max())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="768x768,3072x768,768x3072,1536x768")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--keep", type=int, default=8, help="k = min(m, n) // keep (TSV-M with 8 tasks: 8)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "low-rank-cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    fns = {"torch": (ref.truncated_svd, ref.polar), "ours": (fk.truncated_svd, fk.polar)}
    rows = []
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        x = torch.randn(args.batch, m, n) / (m * n) ** 0.25
        k = min(m, n) // args.keep
        row = {"shape": f"{args.batch}x{m}x{n}", "k": k}
        for name, (trunc, pol) in fns.items():
            row[f"{name}_truncated_s"] = timeit(lambda t=trunc, x=x, k=k: t(x, k), args.repeat, "cpu") / args.batch
            row[f"{name}_polar_s"] = timeit(lambda p=pol, x=x: p(x), args.repeat, "cpu") / args.batch
        # Q alone (what the subspace merges ask): square matrices may take Newton's iteration
        row["ours_polar_q_s"] = timeit(lambda x=x: fk.polar(x, values=False), args.repeat, "cpu") / args.batch
        row["truncated_speedup"] = row["torch_truncated_s"] / row["ours_truncated_s"]
        row["polar_speedup"] = row["torch_polar_s"] / row["ours_polar_s"]
        row["polar_q_speedup"] = row["torch_polar_s"] / row["ours_polar_q_s"]
        row.update(_errors(x, k, fns))
        rows.append({key: round(v, 9) if isinstance(v, float) else v for key, v in row.items()})
        print(
            f"{row['shape']:>14} k={k:<4} truncated {row['torch_truncated_s'] * 1e3:7.1f} -> "
            f"{row['ours_truncated_s'] * 1e3:6.1f} ms ({row['truncated_speedup']:.2f}x)   polar "
            f"{row['torch_polar_s'] * 1e3:7.1f} -> {row['ours_polar_s'] * 1e3:6.1f} ms ({row['polar_speedup']:.2f}x),"
            f" Q alone {row['ours_polar_q_s'] * 1e3:6.1f} ms ({row['polar_q_speedup']:.2f}x)"
            f"   errors: truncated {row['torch_truncated_error']:.1e} / {row['ours_truncated_error']:.1e},"
            f" polar {row['torch_polar_error']:.1e} / {row['ours_polar_error']:.1e} / {row['ours_polar_q_error']:.1e}",
            flush=True,
        )
    report = {**header("low_rank"), "threads": torch.get_num_threads(), "dtype": "float32", "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
