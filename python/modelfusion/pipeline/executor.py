"""Runs a plan: a reader thread loads the next tensors while the kernels merge the current ones,
under a hard memory budget; shards are written atomically and journaled so ``resume`` continues
after a crash or Ctrl-C with byte-identical output."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import mmap
import os
import queue
import resource
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import fusion_kernels as fk
from fusion_kernels import __version__
from fusion_kernels.methods import METHODS, merge_tensor, scratch_buffer_bytes

from ..errors import OutputError, short_repr
from ..io.checkpoint import FLOAT8, SAFETENSORS_INDEX
from ..io.vocabulary import write_tokenizer
from ..io.writer import PARTIAL, ShardWriter, copy_model_files, write_index, write_json_atomic, write_text_atomic
from .plan import FLOATS, Plan, TensorTask

JOURNAL = ".modelfusion-journal.json"
JOURNAL_GLOB = ".modelfusion-journal*.json"
# Tensors the reader loads ahead of the merge. More does not help (reading outruns merging and
# writing) and costs fresh memory, whose first touch is slow (see MemoryBudget).
PREFETCH = 2
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


class MemoryBudget:
    """Bytes reserved by tensors in flight, plus a pool of written outputs kept for reuse.

    Fresh memory costs a page fault per 4 KiB on first touch (about 2 GB/s on the VM we measure
    on, slower than the page cache), and a model repeats the same tensor sizes layer after layer,
    so output buffers are recycled by size. Pooled bytes count against the limit: ``acquire``
    drops pooled buffers before it waits."""

    def __init__(self, limit: int):
        self.limit, self.used, self.pooled, self.high_water = limit, 0, 0, 0
        self._pool: dict[int, list[torch.Tensor]] = {}
        self._cond = threading.Condition()
        self.retired: queue.Queue[torch.Tensor] | None = None  # set by stop_pooling

    def acquire(self, nbytes: int, stop: threading.Event) -> bool:
        with self._cond:
            while self.used and self.used + nbytes > self.limit:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self._drop(self.used + self.pooled + nbytes - self.limit)
            self.used += nbytes
            self.high_water = max(self.high_water, self.used + self.pooled)
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` for an output: a pooled one when there is one."""
        with self._cond:
            free = self._pool.get(nbytes)
            if free:
                self.pooled -= nbytes
                return free.pop()
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        # page-aligned (an anonymous mapping): the writer hands such an output to the disk uncopied
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)

    def give(self, buffer: torch.Tensor | None, nbytes_released: int) -> None:
        """Pool ``buffer`` (when not None; into ``retired`` after stop_pooling) while releasing
        ``nbytes_released`` of a reservation."""
        with self._cond:
            if buffer is not None and self.retired is not None:
                self.retired.put(buffer)
            elif buffer is not None:
                self._pool.setdefault(buffer.nbytes, []).append(buffer)
                self.pooled += buffer.nbytes
            self.used -= nbytes_released
            self._cond.notify_all()

    def stop_pooling(self) -> None:
        """After the last take: the pool is freed now, and buffers given from here on go to the
        queue ``retired`` for the caller to free. Unmapping the pool of a 1.1B merge (0.4 GB) took
        0.11 s; the merge thread does it while the disk writes the last outputs, not after."""
        with self._cond:
            pool, self._pool, self.pooled = self._pool, {}, 0
            self.retired = queue.Queue()
        del pool

    def _drop(self, excess: int) -> None:
        for size in sorted(self._pool, reverse=True):
            while excess > 0 and self._pool[size]:
                self._pool[size].pop()
                self.pooled -= size
                excess -= size


class GiveBack:
    """``on_written`` for the writer: gives ``buffer`` back to ``budget`` and keeps no reference to
    it (the disk's thread, which calls this, must not be the one left to unmap it)."""

    def __init__(self, budget: MemoryBudget, buffer: torch.Tensor | None, nbytes_released: int):
        self.budget, self.buffer, self.nbytes_released = budget, buffer, nbytes_released

    def __call__(self) -> None:
        buffer, self.buffer = self.buffer, None
        self.budget.give(buffer, self.nbytes_released)


@dataclass
class RunStats:
    seconds: float
    read_bytes: int
    written_bytes: int
    shards_written: int
    shards_resumed: int
    budget_high_water: int
    peak_rss: int  # of this process since it started, bytes
    processes: int = 1  # ranks of a distributed run: bytes and shards are their sums, peak_rss their maximum
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (Phases), this process's

    @property
    def read_gbs(self) -> float:
        return self.read_bytes / max(self.seconds, 1e-9) / 1e9


def peak_rss() -> int:
    """This process's peak resident memory: VmHWM (ru_maxrss survives exec, so a child would report
    its parent's peak), or ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def journal_name(rank: int | None = None) -> str:
    """The journal of a single-process run, or of one rank of a distributed one."""
    return JOURNAL if rank is None else f".modelfusion-journal-rank{rank:05d}.json"


def finished_shards(out: Path, resume: bool, fingerprint: str) -> dict[str, int]:
    """Check ``out`` without writing: it must be new or empty, or (``resume``) hold journals of this
    plan's ``fingerprint``. Returns the shards every journal there records as finished and whose
    files are whole, {file: size}: a run may resume another's with a different number of ranks."""
    if (out / SAFETENSORS_INDEX).exists():
        if resume and completed_fingerprint(out) == fingerprint:
            raise AlreadyMerged(f"{out}: this merge is already complete; nothing to resume")
        raise OutputError(f"{out}: already holds a complete merged model ({SAFETENSORS_INDEX} exists)")
    journals = sorted(out.glob(JOURNAL_GLOB)) if resume and out.is_dir() else []
    if journals:
        done = {}
        for path in journals:
            try:
                journal = json.loads(path.read_text())
                if not isinstance(journal, dict) or not isinstance(journal.get("shards"), dict):
                    raise ValueError("expected an object with a 'shards' mapping")
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
                raise OutputError(
                    f"{path}: a corrupt journal ({short_repr(str(e), 120)}); remove it (and the shards it "
                    "names) to merge afresh"
                ) from e
            if journal.get("fingerprint") != fingerprint:
                raise OutputError(f"{out}: {path.name} is of another recipe or other inputs; cannot resume")
            for file, size in journal["shards"].items():
                if (out / file).exists() and (out / file).stat().st_size == size:
                    done[file] = size
        return done
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; the output is a directory (new or empty)")
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out}: not empty; choose an empty directory (or --resume an interrupted merge)")
    return {}


class AlreadyMerged(OutputError):
    """``resume`` found this very merge complete in the output directory: there is nothing to do."""


def completed_fingerprint(out: Path) -> str | None:
    """The fingerprint a finished merge recorded in its index, or None."""
    try:
        index = json.loads((out / SAFETENSORS_INDEX).read_text())
        return index["metadata"]["modelfusion_fingerprint"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        return None


def make_output_dir(out: Path) -> bool:
    """Create directory ``out`` (and its parents) if needed; returns whether it was created."""
    try:
        out.mkdir(parents=True)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise OutputError(f"{out}: cannot create: {e}") from e


def start_journal(out: Path, name: str, fingerprint: str, done: dict[str, int], **extra) -> tuple[Path, dict]:
    """Write the journal ``name`` in ``out`` recording ``done``; returns its path and content (the
    writer adds each shard it commits)."""
    journal = {"fingerprint": fingerprint, "shards": dict(done), **extra}
    write_json_atomic(out / name, journal)
    return out / name, journal


@contextlib.contextmanager
def output_lock(out: Path, shared: bool = False):
    """Hold a lock on directory ``out`` while merging into it: exclusive for a single-process run,
    shared by the ranks of a distributed one. A second merge into the same directory (a ``--resume``
    while the first still runs, a retried job) then stops before it writes anything, where the two
    would overwrite each other's journal and one would rename the other's half-written shard into
    place as a finished one. The lock is
    ``flock`` on the directory itself (no file is added to the output) and goes with the process; a
    file system without it (NFS refuses an exclusive one on a directory) merges unlocked."""
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise OutputError(f"{out}: cannot open the output directory: {e}") from e
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{out}: another merge is writing to this directory (it holds its lock): wait for it to "
                "finish, or stop it and run again with --resume"
            ) from None
        except OSError:
            pass  # no locks on this file system
        yield
    finally:
        os.close(fd)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
ALLOCATOR_LIMIT = 4 * 2**20


def release_freed_memory_promptly() -> None:
    """Make glibc hand freed blocks of 4 MiB and more straight back to the system. By default it
    raises its mmap threshold up to 32 MiB after the first large free and keeps up to twice that per
    thread arena, so tensors freed by the reader, merge and writer threads stay resident, uncounted
    by the budget (measured here: 100–200 MB past the budget). A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, ALLOCATOR_LIMIT)
        libc.mallopt(M_TRIM_THRESHOLD, ALLOCATOR_LIMIT)
    except (OSError, AttributeError):
        pass


@dataclass
class Phases:
    """Seconds each thread of a merge spent per phase: ``read`` (the reader mapping and populating
    inputs), ``compute`` (the merge), ``write`` (the writer copying results out and committing shards,
    the disk's time included), ``wait`` (the merge waiting for the reader). Threads overlap, so the
    phases add up to more than the wall time when they do."""

    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    wait: float = 0.0


def _reader(plan, tasks, budget, ready: queue.Queue, stop: threading.Event, phases: Phases) -> None:
    try:
        for task in tasks:
            if not budget.acquire(task.peak_bytes, stop):
                return
            start = time.perf_counter()
            tensors = [None if i is None else plan.checkpoints[k].map(i.name) for k, i in enumerate(task.inputs)]
            phases.read += time.perf_counter() - start
            while not stop.is_set():
                try:
                    ready.put((task, tensors), timeout=0.1)
                    break
                except queue.Full:
                    continue
            del tensors  # else this thread keeps them mapped while it waits for the next reservation
            if stop.is_set():
                return
    except BaseException as e:  # handed to the main thread, which raises it
        ready.put((None, e))


def _releaser(released: queue.Queue, budget: MemoryBudget) -> None:
    """Unmaps merged tensors' inputs and then releases their bytes, off the merge thread: unmapping
    a 1.1B model's inputs takes a few tenths of a second of a core (the page tables' teardown), which
    the merge thread would spend with the kernels' other threads idle. ``None`` means stop."""
    while (item := released.get()) is not None:
        nbytes = item[1]
        del item  # the last reference to the inputs: their mappings go here
        budget.release(nbytes)


def compute_task(
    plan: Plan,
    task: TensorTask,
    tensors: list,
    device: str,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    take: Callable[[int], torch.Tensor] | None = None,
):
    """The merged tensor of ``task`` (written into ``out`` when the method can; ``scratch``: the
    method's reusable scratch buffer, see :func:`fusion_kernels.methods.merge_tensor`). On the CPU,
    ``take(nbytes)`` gives the buffers the inputs and a result in another ``out_dtype`` are converted
    into (by default fresh memory)."""
    if task.passthrough:
        return next(t for t in tensors if t is not None)
    if device == "cpu" and take is not None:
        tensors = [None if t is None else _converted(t, task.compute_dtype, take) for t in tensors]
    else:
        tensors = [None if t is None else t.to(device=device, dtype=task.compute_dtype) for t in tensors]
    if task.vocabulary is not None:
        tensors = task.vocabulary.align(tensors)
    base = tensors[task.base] if task.base is not None else None
    others = [tensors[k] for k in task.merged]
    result = merge_tensor(plan.recipe.merge_method, base, others, task.params, task.seed, out=out, scratch=scratch)
    if result.device.type == "cpu" and take is not None and result.dtype != task.out.dtype:  # out_dtype
        return _converted(result, task.out.dtype, take)
    return result.to(device="cpu", dtype=task.out.dtype)


def _converted(t: torch.Tensor, dtype: torch.dtype, take: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``t.to(dtype)`` written into a buffer from ``take`` by ``fk.cast``: fresh memory costs a page
    fault per 4 KiB on first touch, and torch converts bfloat16 to float16 an element at a time; the
    two made a recipe's ``dtype: float16`` on bfloat16 models (as many mergekit recipes say) 2-3
    times slower than a native one."""
    if t.dtype == dtype:
        return t
    out = take(t.numel() * dtype.itemsize).view(dtype).view(t.shape)
    return fk.cast(t, dtype, out=out) if t.dtype in FLOATS else out.copy_(t)  # FP8: torch's


def _take_recorded(budget: MemoryBudget, taken: list[torch.Tensor], nbytes: int) -> torch.Tensor:
    taken.append(budget.take(nbytes))
    return taken[-1]


def _shares_memory(buffer: torch.Tensor, result) -> bool:
    if not isinstance(result, torch.Tensor):
        return False
    return result.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def _whole_buffer(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s storage as a flat uint8 tensor, when ``t`` is a CPU tensor that covers all of it."""
    if (
        t.device.type != "cpu"
        or not t.is_contiguous()
        or t.storage_offset()
        or t.untyped_storage().nbytes() != t.nbytes
    ):
        return None
    return t.view(-1).view(torch.uint8)


def _writer(
    out: Path,
    todo,
    budget: MemoryBudget,
    results: queue.Queue,
    journal_path: Path,
    journal: dict,
    failure: list,
    phases: Phases,
) -> None:
    """Writes the merged tensors in plan order, committing and journaling each shard; ``None`` in
    ``results`` means stop (the shard being written is removed)."""
    try:
        for file, shard in todo:
            writer = ShardWriter(out / file, [t.out for t in shard])
            try:
                for _ in shard:
                    item = results.get()
                    if item is None:
                        writer.abort()
                        return
                    task, result = item
                    pooled = None if task.passthrough else _whole_buffer(result)
                    start = time.perf_counter()
                    writer.write(result, on_written=GiveBack(budget, pooled, task.out.nbytes))
                    phases.write += time.perf_counter() - start
                    del item, result, pooled
            except BaseException:
                writer.abort()
                raise
            start = time.perf_counter()
            journal["shards"][file] = writer.commit()
            phases.write += time.perf_counter() - start
            write_json_atomic(journal_path, journal)
    except BaseException as e:  # raised in the main thread
        failure.append(e)


class DeferredSignals:
    """SIGINT and SIGTERM while the reader and writer run: the handler only records the signal, and
    the merge thread raises it, through the handler it displaced, at its next safe point (``check``).
    Raised by the handler itself, the exception can land while the merge thread holds a queue's or
    the budget's lock, and the other threads then wait on that lock forever (a hang seen in CI). A
    second signal while the threads stop is held back until they have. Only Python handlers are
    deferred: a default or ignored disposition acts at once as it always does."""

    def __init__(self):
        self.pending: int | None = None
        self.raised = False
        self.displaced: dict = {}

    def __enter__(self) -> DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if callable(signal.getsignal(signum)):
                    self.displaced[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.pending is None:
            self.pending = signum

    def check(self) -> None:
        if self.pending is not None and not self.raised:
            self.raised = True
            self.displaced[self.pending](self.pending, None)

    def __exit__(self, *exc) -> None:
        for signum, handler in self.displaced.items():
            signal.signal(signum, handler)


def _next(ready: queue.Queue, failure: list, signals: DeferredSignals):
    while True:
        signals.check()
        if failure:
            raise failure[0]
        try:
            task, tensors = ready.get(timeout=0.05)
        except queue.Empty:
            continue
        if task is None:
            raise tensors
        return task, tensors


@dataclass
class Executed:
    read_bytes: int
    written_bytes: int
    budget_high_water: int
    phases: Phases


def execute(
    plan: Plan,
    out: Path,
    todo: list[tuple[str, list[TensorTask]]],
    journal_path: Path,
    journal: dict,
    *,
    progress: bool = True,
    on_tensor=None,
    desc: str = "merge",
    threads: int | None = None,
) -> Executed:
    """Merge and write the shards ``todo`` [(file, tasks)], journaling each one committed.
    ``on_tensor(read_bytes)`` is called after each tensor is merged; what it raises stops the run.
    ``threads``: the kernels' threads when the recipe sets none (default: torch's setting).

    Three threads overlap: a reader loads the next tensors, the caller's thread merges, a writer
    streams results to disk; the memory budget bounds the bytes of all tensors they hold."""
    release_freed_memory_promptly()
    for file, _ in todo:  # left by a run that was killed while writing it
        (out / (file + PARTIAL)).unlink(missing_ok=True)
    tasks = [t for _, shard in todo for t in shard]
    budget, results, stop = MemoryBudget(plan.memory_budget), queue.Queue(), threading.Event()
    ready = queue.Queue(maxsize=PREFETCH)
    failure, phases = [], Phases()
    reader = threading.Thread(target=_reader, args=(plan, tasks, budget, ready, stop, phases), daemon=True)
    released = queue.Queue()
    releaser = threading.Thread(target=_releaser, args=(released, budget), daemon=True)
    writer = threading.Thread(
        target=_writer, args=(out, todo, budget, results, journal_path, journal, failure, phases), daemon=True
    )
    previous_threads = torch.get_num_threads()
    if plan.recipe.threads or threads:
        torch.set_num_threads(plan.recipe.threads or threads)
    bar = tqdm(total=sum(t.read_bytes for t in tasks), unit="B", unit_scale=True, desc=desc, disable=not progress)
    with DeferredSignals() as signals:
        reader.start()
        writer.start()
        releaser.start()
        try:
            for _ in tasks:
                start = time.perf_counter()
                task, tensors = _next(ready, failure, signals)
                phases.wait += time.perf_counter() - start
                buffer = scratch = None
                on_cpu = plan.recipe.device == "cpu" and not task.passthrough
                if on_cpu and task.compute_dtype == task.out.dtype and METHODS[task.method].writes_out:
                    buffer = budget.take(task.out.nbytes).view(task.out.dtype).view(task.out.shape)
                scratch_bytes = scratch_buffer_bytes(task.method, task.numel, task.compute_dtype) if on_cpu else 0
                if scratch_bytes:  # pooled like the outputs: its pages are touched once per run, not per tensor
                    scratch = budget.take(scratch_bytes)
                converted: list[torch.Tensor] = []  # the buffers the inputs (and an out_dtype result) went into
                take = functools.partial(_take_recorded, budget, converted)
                start = time.perf_counter()
                with torch.no_grad():
                    result = compute_task(plan, task, tensors, plan.recipe.device, buffer, scratch, take)
                phases.compute += time.perf_counter() - start
                # the scratch and the converted inputs go back to the pool at once (the next tensor reuses
                # them; not a buffer the result lives in, as a method may return an input); the inputs'
                # bytes are released once the releaser has unmapped them (else the reader maps the next
                # tensor's inputs while these still count in RSS); the result's memory is pooled once written
                budget.give(scratch, 0)
                for pooled in converted:
                    if not _shares_memory(pooled, result):
                        budget.give(pooled, 0)
                del converted, take
                released.put((tensors, task.peak_bytes - task.out.nbytes))
                del tensors, buffer, scratch
                results.put((task, result))
                del result
                bar.update(task.read_bytes)
                if on_tensor is not None:
                    on_tensor(task.read_bytes)
            budget.stop_pooling()
            while writer.is_alive():  # freeing each output the writer is done with
                with contextlib.suppress(queue.Empty):
                    budget.retired.get(timeout=0.05)
                signals.check()
            if failure:
                raise failure[0]
            signals.check()
        except BaseException:
            results.put(None)
            raise
        finally:
            # both threads are stopped and joined on every way out (Ctrl-C included): a daemon thread still
            # inside torch or the kernels at interpreter shutdown can abort the process
            stop.set()
            released.put(None)
            writer.join()
            reader.join()
            releaser.join()
            bar.close()
            torch.set_num_threads(previous_threads)
    return Executed(
        read_bytes=sum(t.read_bytes for t in tasks),
        written_bytes=sum(journal["shards"][f] for f, _ in todo),
        budget_high_water=budget.high_water,
        phases=phases,
    )


def finalize(plan: Plan, out: Path) -> None:
    """After every shard: the base model's config and tokenizer files, then the index (the mark of
    a complete output); the journals go last."""
    reference = plan.checkpoints[0]  # the base model when there is one
    if reference.path.is_dir():
        config = reference.config or {}
        out_dtype = plan.recipe.out_dtype or plan.recipe.dtype
        merged = Counter(t.out.dtype for t in plan.tasks if not t.passthrough)
        fp8_read = any(i is not None and i.dtype in FLOAT8 for t in plan.tasks for i in t.inputs)
        if out_dtype is None and merged and fp8_read:
            out_dtype = merged.most_common(1)[0][0]  # an FP8 model's config must name the dtype written now
        key = "dtype" if "dtype" in config else "torch_dtype"
        overrides = {key: DTYPE_NAMES[out_dtype]} if out_dtype is not None else {}
        if "quantization_config" in config:  # we write float tensors, never quantized ones
            overrides["quantization_config"] = None
        overrides.update(plan.config_overrides)
        copy_model_files(reference.path, out, overrides)
    if plan.recipe.tokenizer is not None:
        inputs = plan.recipe.inputs
        write_tokenizer(out, plan.recipe.tokenizer, plan.vocabulary, inputs[0], inputs)
    if plan.recipe.model_card:
        write_text_atomic(out / "mergekit_config.yml", plan.recipe.source.rstrip() + "\n")
        write_text_atomic(out / "README.md", model_card(plan))
    write_index(out, [[t.out for t in shard] for shard in plan.shards], modelfusion_fingerprint=plan.fingerprint())
    for journal in out.glob(JOURNAL_GLOB):
        journal.unlink(missing_ok=True)


def model_card(plan: Plan) -> str:
    """The output's README.md, as mergekit writes one: what was merged, how, and the recipe."""
    recipe = plan.recipe
    models = "\n".join(f"- {m.path}" for m in recipe.models if m.path != recipe.base_model) or "- (none)"
    base = f"`{recipe.base_model}` as the base, and " if recipe.base_model else ""
    return (
        "---\nlibrary_name: transformers\ntags:\n- merge\n- modelfusion\n---\n"
        "# Merged model\n\n"
        f"This model was merged with [modelfusion](https://pypi.org/project/fusion-kernels/) "
        f"{__version__}, method `{recipe.merge_method}`, from {base}these models:\n\n{models}\n\n"
        f"## Configuration\n\nThe recipe as run (also in `mergekit_config.yml`):\n\n```yaml\n"
        f"{recipe.source.strip()}\n```\n"
    )


def run_plan(plan: Plan, out: str | Path, *, resume: bool = False, progress: bool = True) -> RunStats:
    """Merge into directory ``out``: shards, then the base model's config and tokenizer files, then
    the index. Interrupted runs leave only finished shards and the journal; ``resume=True``
    continues them."""
    out = Path(out)
    start = time.perf_counter()
    fingerprint = plan.fingerprint()
    finished_shards(out, resume, fingerprint)  # before creating anything
    created = make_output_dir(out)
    with output_lock(out):
        done = finished_shards(out, resume, fingerprint)  # again: another run may have written since
        journal_path, journal = start_journal(out, JOURNAL, fingerprint, done)
        todo = [(f, s) for f, s in zip(plan.shard_files(), plan.shards, strict=True) if f not in done]
        try:
            executed = execute(plan, out, todo, journal_path, journal, progress=progress)
        except BaseException:
            if not journal["shards"]:  # nothing to resume: leave the directory as it was found
                journal_path.unlink(missing_ok=True)
                if created and not any(out.iterdir()):
                    out.rmdir()
            raise
        finalize(plan, out)
    return RunStats(
        seconds=time.perf_counter() - start,
        read_bytes=executed.read_bytes,
        written_bytes=executed.written_bytes,
        shards_written=len(todo),
        shards_resumed=len(done),
        budget_high_water=executed.budget_high_water,
        peak_rss=peak_rss(),
        phases=vars(executed.phases),
    )
