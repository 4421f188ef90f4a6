"""A module or stored weights -> the weight matrices to analyse, with stable layer names.

May import only the standard library and torch (no other wing): beside ``files``, at the bottom.
"""
