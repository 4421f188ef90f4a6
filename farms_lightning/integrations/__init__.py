"""Other training loops (``transformers.Trainer``: :mod:`farms_lightning.integrations.transformers`).

May import every wing below ``training`` (not ``training`` itself, nor ``cli``); each module needs its own extra.
"""
