"""What an engine lever (fused copies, CUDA graphs) did: a state and the reason for it."""
import enum
from dataclasses import dataclass


class State(enum.Enum):
    UNUSED = "not used yet"
    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class Status:
    """``state`` and a one-line ``reason`` (what was done when on, why not when off).

    ``str(status)`` is the line the CLI's summary prints: ``"on: <reason>"``, ``"off"``, ...
    """
    state: State
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.state.value}: {self.reason}" if self.reason else self.state.value

    @property
    def on(self) -> bool:
        return self.state is State.ON


UNUSED = Status(State.UNUSED)


def on(reason: str) -> Status:
    return Status(State.ON, reason)


def off(reason: str = "") -> Status:
    return Status(State.OFF, reason)
