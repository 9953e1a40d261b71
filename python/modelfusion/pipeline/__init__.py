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
) -> RunStats:
    """Merge the models of ``recipe`` (YAML text, a path, or a Recipe) into the directory ``out``."""
    plan = plan_merge(recipe, memory_budget=memory_budget, allow_pickle=allow_pickle)
    return run_plan(plan, out, resume=resume, progress=progress)


__all__ = ["METHODS", "Plan", "Recipe", "RunStats", "build_plan", "load_recipe", "merge", "plan_merge", "run_plan"]
