from .io import Checkpointer, atomic_torch_save, atomic_write, list_epoch_checkpoints, load_checkpoint_file
from .layouts import LayoutError, d2_to_torchvision, extract_encoder, infer_resnet, torchvision_to_d2

__all__ = ["Checkpointer", "atomic_torch_save", "atomic_write", "list_epoch_checkpoints", "load_checkpoint_file",
           "LayoutError", "d2_to_torchvision", "extract_encoder", "infer_resnet", "torchvision_to_d2"]
