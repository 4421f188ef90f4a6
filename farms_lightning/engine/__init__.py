"""Matrices -> statistics: windows, eigenvalues, power-law fits, the report; pure torch, no Lightning, no files.

May import ``models`` (and ``files``); nothing above it.
"""
