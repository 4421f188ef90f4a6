"""The Lightning and torchmetrics consumers: callback, metric, LR balancer, pruning callback, dashboards.

The only wing that imports Lightning; may import every wing below it (reporting, policies, engine, models, files).
"""
