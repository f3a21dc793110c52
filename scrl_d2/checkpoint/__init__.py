from .io import (
    UNSAFE_LOAD_ENV,
    Checkpointer,
    SafeLoading,
    UnsafeCheckpointError,
    atomic_torch_save,
    has_run_checkpoint,
    list_epoch_checkpoints,
    load_checkpoint_file,
    load_pickle_file,
    load_weights_file,
    prune_epoch_checkpoints,
    unsafe_load_allowed,
)
from .layouts import LayoutError, d2_to_torchvision, extract_encoder, infer_resnet, torchvision_to_d2

__all__ = ["prune_epoch_checkpoints", "Checkpointer",
           "SafeLoading", "atomic_torch_save", "list_epoch_checkpoints", "has_run_checkpoint",
           "load_checkpoint_file", "load_pickle_file", "load_weights_file", "UnsafeCheckpointError",
           "UNSAFE_LOAD_ENV", "unsafe_load_allowed",
           "LayoutError", "d2_to_torchvision", "extract_encoder", "infer_resnet", "torchvision_to_d2"]
