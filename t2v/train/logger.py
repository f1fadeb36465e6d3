"""Run metrics: one JSON object per logged step in `{output_dir}/metrics.jsonl`, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import os


class MetricsLogger:
    """Appends `{"step": N, ...}` lines to metrics.jsonl and scalars to TensorBoard; a no-op when disabled.

    Only rank 0 should be enabled. Non-finite floats are written as strings ("nan", "inf") so every line
    stays valid JSON.
    """

    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = True, start_step: int = 0):
        """`start_step`: the step the run starts from; rows of later steps (logged before a resume from an earlier
        checkpoint) are dropped, so each step appears once."""
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        _truncate_after(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled or not metrics:
            return
        row = {"step": step}
        for key, value in metrics.items():
            row[key] = value if not isinstance(value, float) or math.isfinite(value) else str(value)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _truncate_after(path: str, step: int) -> None:
    """Rewrite `path` (atomically) without rows of steps after `step`; unparsable lines go too."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) < len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(output_dir: str) -> list[dict]:
    """All rows of a run's metrics.jsonl, in order."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
