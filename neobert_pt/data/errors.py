"""The data pipeline's one user-facing error type."""

from neobert_pt.errors import ConfigError


class DataError(ConfigError):
    """A dataset, file or tokenizer named in the config cannot be used; the message is one line naming it.

    Subclasses :class:`ConfigError` so the CLI's single handler prints it without a traceback.
    """
