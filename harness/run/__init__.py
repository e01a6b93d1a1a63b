"""Running sweeps, in the data path's order: config (YAML -> typed), plan and execute one run,
the sweep driver, the results store, and what keeps runs durable and traceable.
"""
