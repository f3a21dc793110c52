from .ddp import create_ddp_model
from .defaults import (
    TrainingDiverged,
    default_argument_parser,
    default_setup,
    resolve_device,
    resolve_output_dir,
    run_main,
)
from .hooks import (
    EpochCheckpointer,
    EventWriters,
    HookBase,
    IterationCheckpointer,
    ProbeEvaluator,
    StepMetrics,
    ThroughputTimer,
)
from .launch import launch
from .step import amp_dtype, build_grad_scaler, optimization_step
from .train_loop import TrainerBase
from .trainer import PretrainTrainer

__all__ = ["TrainingDiverged", "run_main", "create_ddp_model", "default_argument_parser", "default_setup",
           "resolve_device", "resolve_output_dir", "EpochCheckpointer", "EventWriters", "HookBase", "IterationCheckpointer",
           "ProbeEvaluator", "StepMetrics", "ThroughputTimer",
           "launch", "PretrainTrainer", "TrainerBase", "amp_dtype", "build_grad_scaler", "optimization_step"]
