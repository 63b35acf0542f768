"""Config errors: one exception type whose message is meant to be read by a user at a terminal.

A leaf module (stdlib only) so that config classes anywhere in the package (``neobert_pt/config/schema.py``,
``neobert_pt/optim/config.py``, an optimizer's own module) can raise it without importing each other.
"""


class ConfigError(ValueError):
    """A config value, key or combination is invalid; the message names the dotted key and how to fix it."""
