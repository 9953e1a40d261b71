"""One merge across processes and nodes, coordinated through torch.distributed's TCPStore.

Every rank builds the same plan (checked); output shards are dealt to ranks balanced by the bytes
they read and write; each rank reads only its shards' tensors, writes its shards and keeps its own
journal; when all are done, rank 0 writes the config files and the index. Each tensor is computed
by the same code from the same inputs as in one process (DARE's seed depends on the tensor's name
only), so the output is byte-identical to a single-process run.

Ranks exchange only small messages, through the store that ``torchrun`` (or rank 0) serves at
MASTER_ADDR:MASTER_PORT. Each rank beats a heartbeat there every second; a rank that fails
publishes its error, and one that is silent for ``timeout`` seconds (killed, hung, its node
gone) is named in the error every other rank raises. What finished stays for ``--resume``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import DistributedError, OutputError
from ..ranks import deal_by_cost
from .executor import (
    RunStats,
    execute,
    finalize,
    finished_shards,
    journal_name,
    make_output_dir,
    output_lock,
    peak_rss,
    start_journal,
)
from .plan import Plan

BEAT_SECONDS = 1.0
DEFAULT_TIMEOUT = 300.0


def shard_costs(plan: Plan) -> list[int]:
    """Bytes each shard reads and writes: what its time is proportional to on a bandwidth-bound run."""
    return [sum(t.read_bytes + t.out.nbytes for t in shard) for shard in plan.shards]


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def address(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    @classmethod
    def from_env(cls) -> World:
        """RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK), as torchrun sets them."""
        names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [n for n in names if n not in os.environ]
        if missing:
            raise DistributedError(
                f"distributed run: the environment lacks {', '.join(missing)}; launch with torchrun, "
                f"or set {', '.join(names)} for every process"
            )
        try:
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            port = int(os.environ["MASTER_PORT"])
        except ValueError as e:
            raise DistributedError(
                f"distributed run: RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers: {e}"
            ) from e
        if not 0 <= rank < size:
            raise DistributedError(f"distributed run: RANK must be in [0, WORLD_SIZE={size}), got {rank}")
        return cls(rank, size, local_rank, os.environ["MASTER_ADDR"], port)


class Coordinator:
    """Heartbeats, errors and all-gathers of small JSON values over the job's TCPStore. Every wait
    polls the heartbeats of the ranks it waits for, so none can hang on a dead rank."""

    def __init__(self, world: World, timeout: float = DEFAULT_TIMEOUT):
        self.world, self.timeout, self.host = world, timeout, socket.gethostname()
        # Under torchrun the agent serves the store and every worker is a client; else rank 0 serves it.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        try:
            store = dist.TCPStore(
                world.master_addr,
                world.master_port,
                world.size,
                is_master=world.rank == 0 and not agent,
                timeout=timedelta(seconds=timeout),
                wait_for_workers=False,
            )
        except (RuntimeError, OSError) as e:
            raise DistributedError(f"rank {world.rank}: cannot reach the store at {world.address}: {e}") from e
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"modelfusion/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}/", store)
        self._beats, self._stop = 0, threading.Event()
        self.silent: set[int] = set()  # ranks found silent for the timeout: not waited for again
        self._beat()
        self._thread = threading.Thread(target=self._beat_forever, daemon=True)
        self._thread.start()

    # -- store access: every failure of the store itself names it
    def _call(self, fn, *args):
        try:
            return fn(*args)
        except (RuntimeError, OSError) as e:  # DistStoreError and DistNetworkError are RuntimeErrors
            raise DistributedError(
                f"rank {self.world.rank}: lost the job's store at {self.world.address} ({e}); its host "
                "(rank 0, or torchrun's agent) has ended. The finished shards are kept: rerun with --resume"
            ) from e

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(f"beat/{self.world.rank}", str(self._beats))

    def _beat_forever(self) -> None:
        while not self._stop.wait(BEAT_SECONDS):
            try:
                self._beat()
            except (RuntimeError, OSError):
                return  # the store is gone: the main thread's next wait says so

    def check_errors(self) -> None:
        """Raise the first error another rank published."""
        if int(self._call(self.store.add, "errors", 0)) == 0:
            return
        for r in range(self.world.size):
            if r != self.world.rank and self._call(self.store.check, [f"error/{r}"]):
                raise DistributedError(self._call(self.store.get, f"error/{r}").decode())

    def fail(self, error: BaseException) -> None:
        """Publish this rank's error for the others (best effort: the store may be what failed)."""
        if isinstance(error, DistributedError):
            return  # another rank's failure, or the store's: already known to all
        message = f"rank {self.world.rank} ({self.host}) failed: {type(error).__name__}: {error}"
        try:
            self.store.set(f"error/{self.world.rank}", message)
            self.store.add("errors", 1)
        except (RuntimeError, OSError):
            pass

    def all_gather(self, tag: str, value) -> list:
        """Every rank's ``value`` (JSON), in rank order."""
        self._call(self.store.set, f"{tag}/{self.world.rank}", json.dumps(value))
        keys = {r: f"{tag}/{r}" for r in range(self.world.size)}
        self.wait_for(keys)
        return [json.loads(v) for v in self._call(self.store.multi_get, list(keys.values()))]

    def wait_for(self, keys: dict[int, str], errors: bool = True) -> None:
        """Wait until the key of each rank in ``keys`` exists, raising when a rank that has not set
        its key beats no heartbeat for ``timeout`` seconds, or (``errors``) any rank publishes an error."""
        seen: dict[int, tuple[bytes | None, float]] = {}
        pause = 0.005
        while True:
            missing = [r for r, k in keys.items() if not self._call(self.store.check, [k])]
            if not missing:
                return
            if errors:
                self.check_errors()
            now = time.monotonic()
            for r in missing:
                beat = self._call(self.store.get, f"beat/{r}") if self._call(self.store.check, [f"beat/{r}"]) else None
                if r not in seen or seen[r][0] != beat:
                    seen[r] = (beat, now)
                elif now - seen[r][1] > self.timeout:
                    self.silent.add(r)
                    what = "sent no heartbeat" if beat is None else "stopped beating its heartbeat"
                    raise DistributedError(
                        f"rank {r} {what} for {self.timeout:.0f} s (killed, hung, or its node lost): giving up. "
                        "The finished shards are kept: rerun every rank with --resume"
                    )
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def leave(self) -> None:
        """Say this rank is done with the store. Rank 0, which may be serving it, waits for the
        others to leave (or to fall silent) so that none loses the store before its last read."""
        try:
            self.store.set(f"left/{self.world.rank}", "1")
            if self.world.rank == 0:
                others = {r: f"left/{r}" for r in range(1, self.world.size) if r not in self.silent}
                self.wait_for(others, errors=False)  # failed ranks leave too, once they have read the errors
        except (DistributedError, RuntimeError, OSError):
            pass  # the store is gone, or a rank died and its silence was waited out
        finally:
            self._stop.set()
            self._thread.join()


@contextmanager
def joined(world: World | None = None, timeout: float = DEFAULT_TIMEOUT):
    """Join the job (``World.from_env()`` by default) for the ``with`` block: what the block raises
    is published to the other ranks, and the store is left in order at the end."""
    c = Coordinator(world or World.from_env(), timeout)
    try:
        yield c
    except BaseException as e:
        c.fail(e)
        raise
    finally:
        c.leave()


def run_distributed(
    plan: Plan,
    out: str | Path,
    coordinator: Coordinator,
    *,
    resume: bool = False,
    progress: bool = True,
    node_local: bool = False,
) -> RunStats:
    """This rank's part of the merge of ``plan`` into ``out``; returns the run's totals on every rank.

    ``out`` must be one directory all ranks see (shared storage), or with ``node_local`` a
    directory on each node: every node then gets its ranks' shards, rank 0's node the index and
    config files too, and gathering the shards into one directory is the user's step."""
    out, start = Path(out), time.perf_counter()
    c, world = coordinator, coordinator.world
    fingerprint = plan.fingerprint()
    token = uuid.uuid4().hex
    views = c.all_gather("plan", [plan.fingerprint(files=False), token, c.host])
    differ = [r for r, v in enumerate(views) if v[0] != views[0][0]]
    if differ:
        raise DistributedError(
            f"ranks {differ} planned a different merge than rank 0 (another recipe, other models, or "
            "another modelfusion version): every rank must be given the same recipe and inputs"
        )
    token, hosts = views[0][1], [v[2] for v in views]
    files = plan.shard_files()
    owners = deal_by_cost(shard_costs(plan), world.size)
    mine = [i for i, r in enumerate(owners) if r == world.rank]
    # Every rank checks OUT before any rank writes there (on shared storage they see one directory).
    checked = c.all_gather("checked", _attempt(finished_shards, out, resume, fingerprint))
    _raise_first(checked, world.rank)
    done = {files[i]: checked[world.rank]["value"][files[i]] for i in mine if files[i] in checked[world.rank]["value"]}
    make_output_dir(out)
    with ExitStack() as held:  # the ranks share the lock on OUT: a single-process run there stops
        _raise_first(c.all_gather("locked", _attempt(held.enter_context, output_lock(out, shared=True))), world.rank)
        journal_path, journal = start_journal(out, journal_name(world.rank), fingerprint, done, run=token)
        c.all_gather("journals", True)
        if not node_local:
            _raise_first(c.all_gather("shared", _attempt(_check_shared, out, world, token, hosts)), world.rank)
        todo = [(files[i], plan.shards[i]) for i in mine if files[i] not in done]
        # The ranks on one node share its cores: as torchrun does, oversubscribing none (measured: 4 OpenMP
        # threads on 2 cores cost a TIES merge 20% more CPU). A recipe's `threads` still wins.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // hosts.count(c.host))
        executed = execute(
            plan,
            out,
            todo,
            journal_path,
            journal,
            progress=progress and world.rank == 0,
            on_tensor=_throttled(c),
            desc=f"merge (rank 0 of {world.size})",
            threads=threads,
        )
        mine_stats = {
            "read": executed.read_bytes,
            "written": executed.written_bytes,
            "shards": len(todo),
            "resumed": len(done),
            "high_water": executed.budget_high_water,
            "rss": peak_rss(),
        }
        totals = c.all_gather("done", mine_stats)
        if world.rank == 0:
            finalize(plan, out)
        c.all_gather("final", True)  # no rank reports success before rank 0 has written the index
        journal_path.unlink(missing_ok=True)  # (on shared storage rank 0 has removed it already)
        return RunStats(
            seconds=time.perf_counter() - start,
            read_bytes=sum(t["read"] for t in totals),
            written_bytes=sum(t["written"] for t in totals),
            shards_written=sum(t["shards"] for t in totals),
            shards_resumed=sum(t["resumed"] for t in totals),
            budget_high_water=max(t["high_water"] for t in totals),
            peak_rss=max(t["rss"] for t in totals),
            processes=world.size,
        )


def _attempt(fn, *args) -> dict:
    """``fn(*args)`` as a JSON outcome, so that a rank's error reaches every rank in an all-gather."""
    try:
        return {"value": fn(*args)}
    except OutputError as e:
        return {"error": str(e)}


def _raise_first(outcomes: list[dict], rank: int) -> None:
    if "error" in outcomes[rank]:
        raise OutputError(outcomes[rank]["error"])
    for r, o in enumerate(outcomes):
        if "error" in o:
            raise DistributedError(f"rank {r}: {o['error']}")


def _check_shared(out: Path, world: World, token: str, hosts: list[str]) -> None:
    for r in range(world.size):
        path = out / journal_name(r)
        try:
            ok = json.loads(path.read_text()).get("run") == token
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise OutputError(
                f"{out}: rank {world.rank} on {hosts[world.rank]} does not see the journal rank {r} on {hosts[r]} "
                "wrote there, so OUT is not one directory shared by all ranks: give a directory on shared "
                "storage, or pass --node-local to have each node write its shards locally"
            )


def _throttled(c: Coordinator, seconds: float = 0.5):
    """An ``on_tensor`` callback that looks for other ranks' errors at most every ``seconds``."""
    last = [time.monotonic()]

    def check(_bytes: int) -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            c.check_errors()

    return check


def device_for(device: str, local_rank: int) -> str:
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK``; other devices stay."""
    if device == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise DistributedError(
                f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU"
            )
        return f"cuda:{local_rank}"
    return device
