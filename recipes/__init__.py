"""Recipes of the shipped models: the settings and labels that trained pipeline/weights/.

Outside the installed library (pyproject installs only pipeline and flows): run from a
checkout, `python -m recipes NAME --data DIR --out OUT`, with DIR the real-data folder.
"""

from recipes.shipped import RECIPES, recipe, train_and_choose_mode

__all__ = ["RECIPES", "recipe", "train_and_choose_mode"]
