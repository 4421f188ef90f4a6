"""The ``farms-lightning`` command line: stored weights streamed through the engine, cache, pruning, torchrun.

May import ``reporting`` and every wing below it, never ``training`` (the command line does not load Lightning).
"""
