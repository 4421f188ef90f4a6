"""Safe file I/O shared by the callbacks and the command line: atomic writes, bounded JSON, safetensors.

The bottom wing: imports nothing from farms_lightning but :mod:`farms_lightning._version`.
"""
