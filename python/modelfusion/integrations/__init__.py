"""Adapters that let other fusion frameworks run modelfusion's algorithms (FusionBench)."""
