"""Lightning-free history files and figures, used by the training callbacks and by ``farms-lightning plot``.

May import ``policies``, ``engine`` and the wings below them; no Lightning.
"""
