"""Runs a plan: a reader thread loads the next tensors while the kernels merge the current ones,
under a hard memory budget; shards are written atomically and journaled so ``resume`` continues
after a crash or Ctrl-C with byte-identical output."""

from __future__ import annotations

import json
import queue
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import OutputError
from ..io.checkpoint import SAFETENSORS_INDEX
from ..io.writer import PARTIAL, ShardWriter, copy_model_files, write_index, write_json_atomic
from .methods import merge_tensor
from .plan import Plan, TensorTask

JOURNAL = ".modelfusion-journal.json"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


class MemoryBudget:
    """Bytes reserved by tensors in flight; ``acquire`` waits until a reservation fits."""

    def __init__(self, limit: int):
        self.limit, self.used, self.high_water = limit, 0, 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, stop: threading.Event) -> bool:
        with self._cond:
            while self.used and self.used + nbytes > self.limit:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self.used += nbytes
            self.high_water = max(self.high_water, self.used)
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


@dataclass
class RunStats:
    seconds: float
    read_bytes: int
    written_bytes: int
    shards_written: int
    shards_resumed: int
    budget_high_water: int
    peak_rss: int  # of this process since it started, bytes

    @property
    def read_gbs(self) -> float:
        return self.read_bytes / max(self.seconds, 1e-9) / 1e9


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prepare(plan: Plan, out: Path, resume: bool) -> dict[str, int]:
    """Create ``out`` (or check it for resume); returns the finished shards {file: size}."""
    fingerprint = plan.fingerprint()
    journal_path = out / JOURNAL
    if (out / SAFETENSORS_INDEX).exists():
        raise OutputError(f"{out}: already holds a complete merged model ({SAFETENSORS_INDEX} exists)")
    if resume and journal_path.exists():
        journal = json.loads(journal_path.read_text())
        if journal.get("fingerprint") != fingerprint:
            raise OutputError(f"{out}: the journal is of another recipe or other inputs; cannot resume")
        done = {}
        for file, size in journal["shards"].items():
            path = out / file
            if path.exists() and path.stat().st_size == size:
                done[file] = size
        for stale in out.glob("*" + PARTIAL):
            stale.unlink()
        return done
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create: {e}") from e
    if any(out.iterdir()):
        raise OutputError(f"{out}: not empty; choose an empty directory (or --resume an interrupted merge)")
    write_json_atomic(journal_path, {"fingerprint": fingerprint, "shards": {}})
    return {}


def _reader(plan, tasks, budget, ready: queue.Queue, stop: threading.Event) -> None:
    try:
        for task in tasks:
            if not budget.acquire(task.peak_bytes, stop):
                return
            tensors = [None if i is None else plan.checkpoints[k].read(i.name) for k, i in enumerate(task.inputs)]
            ready.put((task, tensors))
            if stop.is_set():
                return
    except BaseException as e:  # handed to the main thread, which raises it
        ready.put((None, e))


def _compute(plan: Plan, task: TensorTask, tensors: list, device: str) -> torch.Tensor:
    if task.passthrough:
        return next(t for t in tensors if t is not None)
    tensors = [None if t is None else t.to(device=device, dtype=task.compute_dtype) for t in tensors]
    base = tensors[plan.base_index] if plan.base_index is not None else None
    others = [tensors[k] for k in plan.merged]
    recipe = plan.recipe
    result = merge_tensor(recipe.merge_method, base, others, task.params, task.seed)
    return result.to(device="cpu", dtype=task.out.dtype)


def run_plan(plan: Plan, out: str | Path, *, resume: bool = False, progress: bool = True) -> RunStats:
    """Merge into directory ``out``: shards, then the base model's config and tokenizer files, then
    the index (the mark of a complete output). Interrupted runs leave only finished shards and the
    journal; ``resume=True`` continues them."""
    out = Path(out)
    start = time.perf_counter()
    done = _prepare(plan, out, resume)
    files = plan.shard_files()
    todo = [(f, s) for f, s in zip(files, plan.shards, strict=True) if f not in done]
    tasks = [t for _, shard in todo for t in shard]
    budget, ready, stop = MemoryBudget(plan.memory_budget), queue.Queue(), threading.Event()
    reader = threading.Thread(target=_reader, args=(plan, tasks, budget, ready, stop), daemon=True)
    threads = plan.recipe.threads
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    bar = tqdm(total=sum(t.read_bytes for t in tasks), unit="B", unit_scale=True, desc="merge", disable=not progress)
    journal = {"fingerprint": plan.fingerprint(), "shards": dict(done)}
    written = 0
    reader.start()
    try:
        for file, shard in todo:
            writer = ShardWriter(out / file, [t.out for t in shard])
            try:
                for _ in shard:
                    task, tensors = ready.get()
                    if task is None:
                        raise tensors
                    with torch.no_grad():
                        result = _compute(plan, task, tensors, plan.recipe.device)
                    writer.write(result)
                    del tensors, result
                    budget.release(task.peak_bytes)
                    bar.update(task.read_bytes)
            except BaseException:
                writer.abort()
                raise
            journal["shards"][file] = writer.commit()
            written += journal["shards"][file]
            write_json_atomic(out / JOURNAL, journal)
    finally:
        stop.set()
        bar.close()
        torch.set_num_threads(previous_threads)
    reference = plan.checkpoints[0]  # the base model when there is one
    if reference.path.is_dir():
        out_dtype = plan.recipe.out_dtype or plan.recipe.dtype
        key = "dtype" if "dtype" in (reference.config or {}) else "torch_dtype"
        overrides = {key: DTYPE_NAMES[out_dtype]} if out_dtype is not None else None
        copy_model_files(reference.path, out, overrides)
    write_index(out, [[t.out for t in shard] for shard in plan.shards])
    (out / JOURNAL).unlink(missing_ok=True)
    return RunStats(
        seconds=time.perf_counter() - start,
        read_bytes=sum(t.read_bytes for t in tasks),
        written_bytes=written,
        shards_written=len(todo),
        shards_resumed=len(done),
        budget_high_water=budget.high_water,
        peak_rss=_peak_rss(),
    )
