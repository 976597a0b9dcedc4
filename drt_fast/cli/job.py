"""What a certify/predict run works on once resolved: the `Job`, and the `Record` the
summary keeps of each input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# The --dataset names (drt_fast.data reads each).
DATASETS = ("digits", "mnist", "cifar10", "imagenet", "npz")


class Record(NamedTuple):
    """What the summary keeps of an input of this run (io.Results' columns, in order)."""

    idx: int
    label: int
    predict: int       # -1: abstain
    radius: float      # exactly what the file holds (0.0 for predict)
    correct: int
    n: int             # estimation draws taken (predict: its draws)


@dataclass
class Job:
    """Everything a certify/predict run needs, resolved from the arguments and the checkpoint."""

    task: str
    smoothed: object  # SmoothedClassifier
    x: object  # [N, C, H, W] float32 in [0, 1] (a tensor, or data.LazyImages for image folders)
    y: list  # [N] labels
    keys: list  # [N] dataset index of each input: the TSV idx and the noise key
    positions: list  # selected positions in x, in order
    config: dict  # the sidecar
    draws_per_input: int  # n0 + n for certify (the most a sequential input may take), n for predict
    group: int  # inputs per engine call (a rank's share of a round)
    channels_last: bool  # whether the draws are written channels-last (what --channels-last became)

    @property
    def sequential(self) -> bool:
        return self.config.get("certification") == "sequential"

    def draws_taken(self, record: Record) -> int:
        """The draws an input took (selection and estimation)."""
        return record.n + (self.config["n0"] if self.task == "certify" else 0)

    def settings(self) -> dict:
        """This run's `io.SEGMENT_SETTINGS` (what the engine made of fuse and CUDA graphs so far)."""
        from .. import fuse

        cfg = self.config
        return {"batch": cfg["batch"], "device": cfg["device"], "fuse": cfg["fuse"],
                "cuda_graphs": cfg["cuda_graphs"],
                "channels_last": f"{cfg['channels_last']}: {'on' if self.channels_last else 'off'}",
                "cifar_resnet_kernel": fuse.cifar_resnet_setting() or None,
                "fused": str(self.smoothed.fuse_status), "graphs": str(self.smoothed.graph_status)}
