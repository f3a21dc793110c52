"""Detectron2's event storage and writers: its own when it is installed, else the same
contract here (fvcore's ``HistoryBuffer`` underneath), so that ``metrics.json`` and the
console line are the same bytes with or without Detectron2 and a Detectron2 user's
``get_event_storage()`` finds the storage of our trainer.

``tests/test_events.py`` feeds the same scalars to both implementations and compares the
files byte for byte (with Detectron2 installed).
"""
import datetime
import json
import logging
import os
import time
from collections import defaultdict
from typing import Dict, Optional, Tuple

import torch
from fvcore.common.history_buffer import HistoryBuffer
from iopath.common.file_io import g_pathmgr

from ..backend import detectron2_available

__all__ = ["EventStorage", "EventWriter", "JSONWriter", "TensorboardXWriter", "CommonMetricPrinter",
           "get_event_storage", "has_event_storage", "HookBase"]

_STACK = []


def _current() -> "EventStorage":
    """The storage of the innermost ``with EventStorage(...)`` (of this module's class)."""
    if not _STACK:
        raise RuntimeError("get_event_storage() needs an active 'with EventStorage(...)' block")
    return _STACK[-1]


def _active() -> bool:
    return bool(_STACK)


get_event_storage, has_event_storage = _current, _active


class EventStorage:
    """Scalars by name, each with its history of (value, iteration) and a smoothing hint."""

    def __init__(self, start_iter: int = 0):
        self._history: Dict[str, HistoryBuffer] = defaultdict(HistoryBuffer)
        self._smoothing_hints: Dict[str, bool] = {}
        self._latest_scalars: Dict[str, Tuple[float, int]] = {}
        self._iter = start_iter
        self._current_prefix = ""
        self._vis_data = []
        self._histograms = []

    def put_image(self, img_name: str, img_tensor) -> None:
        self._vis_data.append((img_name, img_tensor, self._iter))

    def put_scalar(self, name: str, value, smoothing_hint: bool = True, cur_iter: Optional[int] = None) -> None:
        name = self._current_prefix + name
        cur_iter = self._iter if cur_iter is None else cur_iter
        value = float(value)
        self._history[name].update(value, cur_iter)
        self._latest_scalars[name] = (value, cur_iter)
        known = self._smoothing_hints.setdefault(name, smoothing_hint)
        if known != smoothing_hint:
            raise ValueError(f"scalar {name} was put with smoothing_hint {known} before, now {smoothing_hint}")

    def put_scalars(self, *, smoothing_hint: bool = True, cur_iter: Optional[int] = None, **kwargs) -> None:
        for k, v in kwargs.items():
            self.put_scalar(k, v, smoothing_hint=smoothing_hint, cur_iter=cur_iter)

    def history(self, name: str) -> HistoryBuffer:
        if name not in self._history:
            raise KeyError(f"No history metric available for {name}!")
        return self._history[name]

    def histories(self) -> Dict[str, HistoryBuffer]:
        return self._history

    def latest(self) -> Dict[str, Tuple[float, int]]:
        return self._latest_scalars

    def latest_with_smoothing_hint(self, window_size: int = 20) -> Dict[str, Tuple[float, int]]:
        """Latest value, or the median of the values put in the last ``window_size``
        iterations for scalars hinted as noisy."""
        return {k: (self._history[k].median(self.count_samples(k, window_size)) if self._smoothing_hints[k] else v,
                    itr)
                for k, (v, itr) in self._latest_scalars.items()}

    def count_samples(self, name: str, window_size: int = 20) -> int:
        """How many values of ``name`` were put in the last ``window_size`` iterations."""
        data = self._history[name].values()
        n = 0
        for _, it in reversed(data):
            if it <= data[-1][1] - window_size:
                break
            n += 1
        return n

    def smoothing_hints(self) -> Dict[str, bool]:
        return self._smoothing_hints

    def step(self) -> None:
        self._iter += 1

    @property
    def iter(self) -> int:
        return self._iter

    @iter.setter
    def iter(self, val: int) -> None:
        self._iter = int(val)

    @property
    def iteration(self) -> int:
        return self._iter

    def __enter__(self) -> "EventStorage":
        _STACK.append(self)
        return self

    def __exit__(self, *exc) -> None:
        assert _STACK[-1] is self
        _STACK.pop()

    def clear_images(self) -> None:
        self._vis_data = []

    def clear_histograms(self) -> None:
        self._histograms = []


class EventWriter:
    def write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JSONWriter(EventWriter):
    """``metrics.json``: one JSON object a line, keys sorted, with ``iteration``; scalars
    hinted as noisy are the median of the last ``window_size`` iterations."""

    def __init__(self, json_file: str, window_size: int = 20):
        self._file_handle = g_pathmgr.open(json_file, "a")
        self._window_size = window_size
        self._last_write = -1

    def write(self) -> None:
        by_iter: Dict[int, Dict[str, float]] = defaultdict(dict)
        for k, (v, itr) in _current().latest_with_smoothing_hint(self._window_size).items():
            if itr > self._last_write:  # not written yet
                by_iter[itr][k] = v
        if by_iter:
            self._last_write = max(by_iter)
        for itr, scalars in by_iter.items():
            scalars["iteration"] = itr
            self._file_handle.write(json.dumps(scalars, sort_keys=True) + "\n")
        self._file_handle.flush()
        try:
            os.fsync(self._file_handle.fileno())
        except AttributeError:
            pass

    def close(self) -> None:
        self._file_handle.close()


class TensorboardXWriter(EventWriter):
    """Every new scalar (median-smoothed as for ``metrics.json``) to TensorBoard."""

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs):
        self._window_size = window_size
        self._writer_args = {"log_dir": log_dir, **kwargs}
        self._last_write = -1
        self._tb = None

    @property
    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(**self._writer_args)
        return self._tb

    def write(self) -> None:
        storage = _current()
        last = self._last_write
        for k, (v, itr) in storage.latest_with_smoothing_hint(self._window_size).items():
            if itr > self._last_write:
                self._writer.add_scalar(k, v, itr)
                last = max(last, itr)
        self._last_write = last
        for name, img, step in storage._vis_data:
            self._writer.add_image(name, img, step)
        storage.clear_images()
        for params in storage._histograms:
            self._writer.add_histogram_raw(**params)
        storage.clear_histograms()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class CommonMetricPrinter(EventWriter):
    """The console line of Detectron2's trainers: ETA, iteration, losses (median of the
    window), ``[metric]`` scalars, time, data time, LR, peak GPU memory."""

    def __init__(self, max_iter: Optional[int] = None, window_size: int = 20):
        self.logger = logging.getLogger("scrl_d2.utils.events")
        self._max_iter = max_iter
        self._window_size = window_size
        self._last_write = None

    def _get_eta(self, storage: EventStorage) -> Optional[str]:
        if self._max_iter is None:
            return ""
        iteration = storage.iter
        try:
            eta_seconds = storage.history("time").median(1000) * (self._max_iter - iteration - 1)
            storage.put_scalar("eta_seconds", eta_seconds, smoothing_hint=False)
            return str(datetime.timedelta(seconds=int(eta_seconds)))
        except KeyError:  # no "time" scalar: estimate from the calls to write()
            eta = None
            if self._last_write is not None:
                per_iter = (time.perf_counter() - self._last_write[1]) / (iteration - self._last_write[0])
                eta = str(datetime.timedelta(seconds=int(per_iter * (self._max_iter - iteration - 1))))
            self._last_write = (iteration, time.perf_counter())
            return eta

    def _median(self, storage: EventStorage, k: str, v: HistoryBuffer) -> str:
        return "{}: {:.4g}".format(k, v.median(storage.count_samples(k, self._window_size)))

    def write(self) -> None:
        storage = _current()
        iteration = storage.iter
        if iteration == self._max_iter:  # after training: nothing new to print
            return
        try:
            data = storage.history("data_time")
            avg_data_time, last_data_time = data.avg(storage.count_samples("data_time", self._window_size)), data.latest()
        except KeyError:
            avg_data_time = last_data_time = None
        try:
            avg_iter_time, last_iter_time = storage.history("time").global_avg(), storage.history("time").latest()
        except KeyError:
            avg_iter_time = last_iter_time = None
        try:
            lr = "{:.5g}".format(storage.history("lr").latest())
        except KeyError:
            lr = "N/A"
        eta = self._get_eta(storage)
        max_mem_mb = torch.cuda.max_memory_allocated() / 1024.0 / 1024.0 if torch.cuda.is_available() else None
        hist = storage.histories().items()
        self.logger.info(
            " {eta}iter: {iter}  {losses}  {non_losses}  {avg_time}{last_time}{avg_data_time}{last_data_time} "
            "lr: {lr}  {memory}".format(
                eta=f"eta: {eta}  " if eta else "",
                iter=iteration,
                losses="  ".join(self._median(storage, k, v) for k, v in hist if "loss" in k),
                non_losses="  ".join(self._median(storage, k, v) for k, v in hist if "[metric]" in k),
                avg_time="time: {:.4f}  ".format(avg_iter_time) if avg_iter_time is not None else "",
                last_time="last_time: {:.4f}  ".format(last_iter_time) if last_iter_time is not None else "",
                avg_data_time="data_time: {:.4f}  ".format(avg_data_time) if avg_data_time is not None else "",
                last_data_time="last_data_time: {:.4f}  ".format(last_data_time) if last_data_time is not None else "",
                lr=lr,
                memory="max_mem: {:.0f}M".format(max_mem_mb) if max_mem_mb is not None else ""))


class HookBase:
    """Detectron2's hook interface: the trainer sets ``self.trainer`` and calls these."""

    trainer = None

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_backward(self) -> None: ...

    def after_step(self) -> None: ...

    def state_dict(self) -> Dict:
        return {}


# The classes above, whichever set is exported (tests compare the two).
OWN = {name: globals()[name] for name in __all__}

if detectron2_available():  # Detectron2's own: its hooks and models find our storage
    from detectron2.engine.train_loop import HookBase  # noqa: F811
    from detectron2.utils.events import (  # noqa: F811
        CommonMetricPrinter,
        EventStorage,
        EventWriter,
        JSONWriter,
        TensorboardXWriter,
        get_event_storage,
        has_event_storage,
    )


def history_state(storage, kept: int = 20) -> Dict:
    """The last ``kept`` values of each scalar in ``storage`` (ours or Detectron2's
    EventStorage), as tensors: the writers smooth over the last 20 values (median), so a
    resumed run that restores them writes the same ``metrics.json`` lines as an
    uninterrupted run."""
    import torch

    hints = storage.smoothing_hints()
    out = {}
    for name, buf in storage.histories().items():
        values = buf.values()[-kept:]
        out[name] = {"values": torch.tensor([float(v) for v, _ in values], dtype=torch.float64),
                     "iterations": torch.tensor([int(i) for _, i in values], dtype=torch.int64),
                     "smoothing_hint": bool(hints.get(name, True))}
    return out


def restore_history(storage, state: Dict) -> None:
    """Put :func:`history_state`'s values back, without writing them again (``put_scalar``
    would make the writers emit old iterations)."""
    for name, h in state.items():
        buf = HistoryBuffer()
        for v, i in zip(h["values"].tolist(), h["iterations"].tolist()):
            buf.update(v, i)
        storage._history[name] = buf
        storage._smoothing_hints[name] = h["smoothing_hint"]
