"""scrl_d2: SCRL and BYOL self-supervised pretraining for object detection."""
__version__ = "0.1.0"
