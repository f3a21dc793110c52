"""The transfer suite: pretrained checkpoints x downstream protocols x trials -> fine-tuning
runs -> one table. A new protocol is a row of :data:`.protocols.PROTOCOLS`, a new preset a
row of :data:`.presets.PRESETS`, a new study a row of :data:`.study.STUDIES`; the dataset
formats the protocols read are :mod:`scrl_d2.detection.formats`.
"""
from .protocols import GROUPS, PROTOCOLS, Protocol, get_protocol
from .suite import RANDOM_INIT, Interrupted, TransferRun, TransferSuite, mean_std

__all__ = ["GROUPS", "PROTOCOLS", "Protocol", "get_protocol", "RANDOM_INIT", "Interrupted", "TransferRun",
           "TransferSuite", "mean_std"]
