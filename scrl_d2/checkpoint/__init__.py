from .io import (
    CheckpointWriteError,
    Checkpointer,
    atomic_torch_save,
    atomic_write,
    list_epoch_checkpoints,
    load_checkpoint_file,
    prune_epoch_checkpoints,
    remove_stale_temporaries,
)
from .layouts import LayoutError, d2_to_torchvision, extract_encoder, infer_resnet, torchvision_to_d2

__all__ = ["CheckpointWriteError", "remove_stale_temporaries", "prune_epoch_checkpoints", "Checkpointer", "atomic_torch_save", "atomic_write", "list_epoch_checkpoints", "load_checkpoint_file",
           "LayoutError", "d2_to_torchvision", "extract_encoder", "infer_resnet", "torchvision_to_d2"]
