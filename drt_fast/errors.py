"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class DrtFastError(Exception):
    """A problem with the user's input, files or configuration (not a bug in drt-fast).

    ``drt-fast`` catches it, prints ``drt-fast: error: <message>`` on stderr and exits 2.
    """


class NonFiniteLogitsError(DrtFastError):
    """The model produced NaN or inf logits for some noisy draw."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty):
    what a one-line error or status shows of an underlying failure."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class InvalidArgument(DrtFastError, ValueError):
    """A bad value given to the Python API (n < 1, alpha outside (0, 1), an unknown mode, ...):
    a ValueError as well, as Python code expects of a bad argument."""


class InvalidArgumentType(DrtFastError, TypeError):
    """An argument of the wrong type given to the Python API (n = "100", a non-tensor, ...)."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is torch.OutOfMemoryError (CUDA) or the CPU allocator's failure: the
    batch is too big, which the caller should hear as such (the CLI suggests a smaller --batch)."""
    text = first_line(err)
    return "out of memory" in text.lower() or "can't allocate memory" in text
