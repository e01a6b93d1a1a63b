"""In-tree quantization methods, one module each. Each imports only ``harness``.

The registry imports these modules lazily (``harness.registry``); nothing is registered by
importing this package.
"""
