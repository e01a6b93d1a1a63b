"""The block-wise engine: one block group at a time through a method, out-of-core (lazy) models,
block checkpoints, memory estimates and the host allocator, calibration statistics.
"""
