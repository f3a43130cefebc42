"""clu metrics and writers for the training loop.

`MetricAverager` averages any dict of scalar metrics over a logging window with a
`clu.metrics.Collection` of `Average`s built for the keys it sees; `make_writer` is clu's
default writer (TensorBoard event files + log lines) under `logdir`.
"""
import math
from typing import Mapping, Optional

import jax
import numpy as np
from clu import metric_writers, metrics


def make_writer(logdir: str) -> metric_writers.MetricWriter:
    # Only process 0 writes TensorBoard files; the others just log.
    return metric_writers.create_default_writer(logdir, just_logging=jax.process_index() > 0)


class MetricAverager:
    def __init__(self):
        self._cls = None
        self._keys = None
        self._value: Optional[metrics.Collection] = None

    def add(self, values: Mapping[str, float]):
        keys = tuple(sorted(values))
        if self._cls is None or keys != self._keys:
            if self._value is not None:
                raise ValueError(f"metric keys changed within a window: {self._keys} -> {keys}")
            self._keys = keys
            self._cls = metrics.Collection.create(**{k: metrics.Average.from_output(k) for k in keys})
        one = self._cls.single_from_model_output(**{k: np.asarray(values[k], np.float32) for k in keys})
        self._value = one if self._value is None else self._value.merge(one)

    def compute_and_reset(self) -> dict:
        if self._value is None:
            return {}
        out = {k: float(v) for k, v in self._value.compute().items()}
        self._value = None
        return out


def first_non_finite(step_metrics: list[tuple[int, Mapping[str, float]]]):
    """(step, metric name, value) of the first non-finite scalar, or None."""
    for step, values in step_metrics:
        for k in sorted(values):
            v = float(np.asarray(values[k]))
            if not math.isfinite(v):
                return step, k, v
    return None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
