"""Whether a benchmark case's timings can be trusted: a case whose median round on either
side is more than NOISY_SPREAD times its fastest ran while something else used the cores,
and its ratio is marked (and should be rerun). The median, not the slowest round: a single
slow round of a 0.1 ms kernel is the OS's jitter, not a busy machine. Not collected by
pytest."""

NOISY_SPREAD = 1.5


def noisy(*round_times) -> bool:
    """Whether any side's median round time is over NOISY_SPREAD times its fastest."""
    return any(len(t) > 1 and sorted(t)[len(t) // 2] > NOISY_SPREAD * min(t) for t in round_times)


def noisy_note(*round_times) -> str:
    """The mark a ``[ratio]`` line gets when `noisy` (else '')."""
    return (f"  [noisy: median round over {NOISY_SPREAD}x the fastest; the machine was busy: rerun]"
            if noisy(*round_times) else "")
