"""Compression algorithms as plain numpy functions on weights and calibration statistics.

The passes (llmasos/passes/quantize.py, prune.py, lowrank.py) apply them to a graph's parameters;
keeping the math here, free of IR, lets tests check each algorithm against its paper's bounds directly.
"""
