"""Calibration statistics: per activation role, the ranges (and for AWQ, sample rows) of every linear
layer's input over the recorded inputs of the three graphs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tidar_export.quantize.calibration import full_feed
from tidar_export.quantize.graph import activation_roles, linear_layers


@dataclasses.dataclass
class ActStats:
    """What the calibration keeps of one activation role, over every graph and decode mode."""

    amax: float = 0.0
    abs_sum: np.ndarray | None = None  # per input channel, for the AWQ search
    count: int = 0
    rows: list = dataclasses.field(default_factory=list)  # a row sample, for the AWQ search
    hist: np.ndarray | None = None  # of |x| over [0, amax], for percentile ranges

    def percentile_amax(self, percentile: float) -> float:
        if self.hist is None or not self.hist.sum():
            return self.amax
        cdf = np.cumsum(self.hist) / self.hist.sum()
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return float(self.amax * min(len(self.hist), i + 1) / len(self.hist))


HIST_BINS = 2048
AWQ_ROWS = 1024  # activation rows kept per role for the AWQ loss


def _probe_session(model, tensors: Sequence[str]):
    """An ORT session over `model` with `tensors` added as outputs (1 thread, quiet)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def activation_stats(graphs: dict[str, object], feeds: dict[str, list[dict]], *, rows: bool = False,
                     histogram: bool = False, seed: int = 0) -> dict[str, ActStats]:
    """Per activation role, merged over the three graphs: max |x|, and optionally the per-channel
    mean |x| and a row sample (AWQ) or a histogram of |x| (percentile ranges, a second pass)."""
    rng = np.random.default_rng(seed)
    stats: dict[str, ActStats] = {}
    sessions = {}
    for kind, model in graphs.items():
        roles = activation_roles(linear_layers(model))
        if not roles or not feeds.get(kind):
            continue
        names = list(roles)
        sessions[kind] = (_probe_session(model, names), names, roles)
    total_rows: dict[str, int] = {}
    for kind, (sess, names, roles) in sessions.items():
        for feed in feeds[kind]:
            for name, x in zip(names, sess.run(names, full_feed(feed, sess))):
                x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
                s = stats.setdefault(roles[name], ActStats())
                s.amax = max(s.amax, float(np.abs(x).max()))
                if rows:
                    a = np.abs(x).sum(0, dtype=np.float64)
                    s.abs_sum = a if s.abs_sum is None else s.abs_sum + a
                    s.count += len(x)
                    seen = total_rows.get(roles[name], 0)
                    for r in x:  # reservoir over rows
                        seen += 1
                        if len(s.rows) < AWQ_ROWS:
                            s.rows.append(r.copy())
                        else:
                            j = int(rng.integers(0, seen))
                            if j < AWQ_ROWS:
                                s.rows[j] = r.copy()
                    total_rows[roles[name]] = seen
    if histogram:
        for kind, (sess, names, roles) in sessions.items():
            for feed in feeds[kind]:
                for name, x in zip(names, sess.run(names, full_feed(feed, sess))):
                    s = stats[roles[name]]
                    h, _ = np.histogram(np.abs(x), bins=HIST_BINS, range=(0.0, s.amax or 1.0))
                    s.hist = h if s.hist is None else s.hist + h
    return stats
