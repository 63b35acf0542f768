"""One exception type for evaluation failures whose message is one line meant for a user at a terminal."""

from neobert_pt.cli import UserError


class EvalError(UserError):
    """A model, dataset or option cannot be used; the message says what was asked and how to fix it.

    A :class:`neobert_pt.cli.UserError`, so ``run_cli`` prints it as one line and exits 2.
    """
