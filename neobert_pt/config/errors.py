"""Config errors: one exception type whose message is meant to be read by a user at a terminal."""


class ConfigError(ValueError):
    """A config value, key or combination is invalid; the message names the dotted key and how to fix it."""
