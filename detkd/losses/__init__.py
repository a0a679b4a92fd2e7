"""Distillation losses: pure functions (and small modules where a method has learnable parts).

Only torch is imported here. Shapes, formulas, references and defaults are in each docstring.
"""
