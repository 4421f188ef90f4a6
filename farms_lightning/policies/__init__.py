"""Statistics -> decisions: layer-wise learning-rate factors (TempBalance), sparsities and pruners.

May import ``engine`` and the wings below it; no Lightning.
"""
