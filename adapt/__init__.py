"""Adaptation: heal a converted ladder model with TRL (`python adapt/sft.py RECIPE.yaml`)."""
