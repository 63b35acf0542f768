"""Optimizers and the registry that builds them from ``optimizer.*`` config.

Import from the modules themselves; this package file imports nothing, so that the torch-free config side
(``catalog.py``: the list of optimizers; ``config.py``: the ``optimizer`` section and the built-in optimizers'
sub-blocks) can be imported without importing any optimizer:

- ``catalog.py``: ``register_optimizer`` and the catalog every list of optimizers derives from;
- ``config.py``: ``OptimizerConfig`` and its sub-blocks (``MuonConfig``, ``Dion2Config``, ``DionConfig``, ``DanaConfig``);
- ``registry.py``: ``OptimizerContext``, ``BuiltOptimizer``, ``build_optimizer`` (what the trainer calls);
- ``lr_rule.py``: ``optimizer.lr: auto``; ``param_groups.py``: the one param-group policy;
- one module per optimizer: ``dana.py``, ``muon.py``, ``dion2.py``, ``dion.py`` (+ their helpers).
"""
