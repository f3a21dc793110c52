"""What a DataLoader worker does with the signals a cluster sends to every process of a
job (SLURM, torchrun's agent): it leaves the stop to the trainer (scrl_d2.engine.preemption),
which stops after its step and checkpoints. Here, not in engine/, because the loaders
(pretraining and detection) call it from their workers and engine imports the loaders."""
import multiprocessing
import os
import signal
import threading

__all__ = ["loader_worker_signals"]


def loader_worker_signals(worker_id: int = 0) -> None:
    """For a DataLoader worker (its ``worker_init_fn`` calls it): the stop signals are the
    trainer's. SIGUSR1/SIGUSR2 are ignored. SIGTERM still ends the worker when its parent
    sends it (how the DataLoader and multiprocessing end workers, which PyTorch's own
    handler also tells apart) or once the parent is gone; from anyone else (torchrun's
    agent signalling the process group, SLURM signalling every process) it is ignored:
    the trainer received it too and ends its workers after its checkpoint. Plain
    ``SIG_IGN`` for SIGTERM would not do: a stuck worker could then never be terminated,
    and multiprocessing waits for it at exit."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return  # not in a loader worker: a trainer's signals are StopSignals' to handle
    for s in (getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)):
        if s is not None:
            signal.signal(s, signal.SIG_IGN)
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")):
        return  # not POSIX with real-time signals (macOS, Windows): SIGTERM keeps its default
    # the DataLoader's process (under forkserver / spawn not the OS parent)
    parent = multiprocessing.parent_process().pid if multiprocessing.parent_process() else os.getppid()
    # Blocked in this thread and in every thread started after it (a forked worker has no
    # other); the thread below takes it with its sender.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def parent_gone() -> bool:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or parent_gone():
                os._exit(0)  # as PyTorch's worker handler does for its parent's SIGTERM

    threading.Thread(target=wait, name="scrl_d2-sigterm", daemon=True).start()
