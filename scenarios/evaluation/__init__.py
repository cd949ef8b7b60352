"""The side-by-side evaluation (`scenarios/evaluate.py`): methods, populations, scores, tables."""
