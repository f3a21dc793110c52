"""Logging set-up: one ``scrl_d2`` logger, coloured on a terminal, mirrored to a file."""
import logging
import os
import sys
from typing import Optional

_COLORS = {logging.WARNING: "\x1b[33m", logging.ERROR: "\x1b[31m", logging.CRITICAL: "\x1b[31;1m"}


class _ColorFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        color = _COLORS.get(record.levelno)
        return f"{color}{msg}\x1b[0m" if color else msg


def setup_logger(output: Optional[str] = None, distributed_rank: int = 0,
                 name: str = "scrl_d2") -> logging.Logger:
    """Rank 0 logs to stdout; every rank logs to ``output/log.txt`` (``.rankN`` suffix)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = "[%(asctime)s %(name)s %(levelname)s] %(message)s"
    datefmt = "%m/%d %H:%M:%S"
    if distributed_rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setLevel(logging.INFO)
        formatter = _ColorFormatter if sys.stdout.isatty() else logging.Formatter
        sh.setFormatter(formatter(fmt, datefmt=datefmt))
        logger.addHandler(sh)
    if output:
        path = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
        if distributed_rank > 0:
            path = f"{path}.rank{distributed_rank}"
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fh = logging.FileHandler(path)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter(fmt, datefmt=datefmt))
        logger.addHandler(fh)
    return logger
