from .io import Checkpointer, atomic_torch_save, atomic_write, list_epoch_checkpoints, load_checkpoint_file

__all__ = ["Checkpointer", "atomic_torch_save", "atomic_write", "list_epoch_checkpoints", "load_checkpoint_file"]
