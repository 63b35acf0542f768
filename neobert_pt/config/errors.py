"""``ConfigError`` for the config package and its callers; it is defined in the leaf module ``neobert_pt/errors.py``
(stdlib only), which optimizer config classes import directly so that they never import ``neobert_pt.config``."""

from neobert_pt.errors import ConfigError

__all__ = ["ConfigError"]
