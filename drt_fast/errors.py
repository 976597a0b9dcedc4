"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class DrtFastError(Exception):
    """A problem with the user's input, files or configuration (not a bug in drt-fast).

    ``drt-fast`` catches it, prints ``drt-fast: error: <message>`` on stderr and exits 2.
    """


class NonFiniteLogitsError(DrtFastError):
    """The model produced NaN or inf logits for some noisy draw."""
