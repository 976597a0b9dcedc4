"""The certify/predict progress bar."""
from __future__ import annotations

import sys


class Progress:
    """The progress bar, in draws (tqdm on stderr, only when stderr is a terminal and not
    --quiet). Its total starts at the fixed-n budget of the inputs left (``budget`` draws
    each); an input that stops early (sequential certification) takes the draws it did not
    use off the total: the bar never shows less work left than there may be, and ends full."""

    def __init__(self, inputs: int, budget: int, quiet: bool):
        self.inputs, self.budget, self.done, self.bar = inputs, budget, 0, None
        if quiet or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=inputs * budget, unit="draw", unit_scale=True, file=sys.stderr,
                        dynamic_ncols=True, postfix=f"0/{inputs} inputs")

    def advance(self, draws: list) -> None:
        """Inputs done, ``draws`` taken by each."""
        self.done += len(draws)
        if self.bar is None or not draws:
            return
        self.bar.total -= sum(self.budget - d for d in draws)
        self.bar.set_postfix_str(f"{self.done}/{self.inputs} inputs", refresh=False)
        self.bar.update(sum(draws))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
