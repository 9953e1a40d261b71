"""The streaming merge pipeline: recipe -> plan -> prefetching, budgeted, resumable executor."""

from __future__ import annotations

from pathlib import Path

from .executor import RunStats, run_plan
from .plan import Plan, build_plan, default_memory_budget
from .recipe import METHODS, Recipe, load_recipe


def plan_merge(recipe: str | Path | Recipe, *, memory_budget: int | None = None, allow_pickle: bool = False) -> Plan:
    """Parse (if needed) and plan a recipe; ``memory_budget`` overrides the recipe's, which defaults
    to half the available memory."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    budget = memory_budget or recipe.memory_budget or default_memory_budget()
    return build_plan(recipe, memory_budget=budget, allow_pickle=allow_pickle)


def merge(
    recipe: str | Path | Recipe,
    out: str | Path,
    *,
    memory_budget: int | None = None,
    resume: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    device: str | None = None,
    distributed: bool = False,
    node_local: bool = False,
    timeout: float = 300.0,
) -> RunStats:
    """Merge the models of ``recipe`` (YAML text, a path, or a Recipe) into the directory ``out``.

    ``distributed``: this process is one rank of a merge shared by WORLD_SIZE processes (the
    launcher's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK variables, as torchrun
    sets them); see :mod:`modelfusion.pipeline.distributed` for ``node_local`` and ``timeout``.
    Every rank returns the whole run's totals. ``device`` overrides the recipe's."""
    if not distributed:
        recipe = _with_device(recipe, device)
        plan = plan_merge(recipe, memory_budget=memory_budget, allow_pickle=allow_pickle)
        return run_plan(plan, out, resume=resume, progress=progress)
    from .distributed import World, device_for, joined, run_distributed

    world = World.from_env()
    with joined(world, timeout) as coordinator:  # errors from here on reach the other ranks
        recipe = _with_device(recipe, device)
        recipe.device = device_for(recipe.device, world.local_rank)
        plan = plan_merge(recipe, memory_budget=memory_budget, allow_pickle=allow_pickle)
        return run_distributed(plan, out, coordinator, resume=resume, progress=progress, node_local=node_local)


def _with_device(recipe: str | Path | Recipe, device: str | None) -> Recipe:
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if device:
        recipe.device = device
    return recipe


__all__ = ["METHODS", "Plan", "Recipe", "RunStats", "build_plan", "load_recipe", "merge", "plan_merge", "run_plan"]
