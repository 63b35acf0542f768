"""One exception type for evaluation failures whose message is one line meant for a user at a terminal."""


class EvalError(RuntimeError):
    """A model, dataset or option cannot be used; the message says what was asked and how to fix it."""
