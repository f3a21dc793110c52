"""Every configuration key of scrl_d2 and its default, in one place.

Keys follow Detectron2's names where Detectron2 has one (``MODEL.RESNETS.*``,
``SOLVER.BASE_LR``, ``DATALOADER.NUM_WORKERS``, ``OUTPUT_DIR`` ...), so the same YAML
files also merge into Detectron2's own config (see ``add_scrl_config``). Method keys
live under ``MODEL.BYOL`` (shared by both methods) and ``MODEL.SCRL`` (box pairs).
Defaults are the official SCRL 200-epoch release on ResNet-50.
"""
from fvcore.common.config import CfgNode as CN

_C = CN()
_C.VERSION = 2

# ---------------------------------------------------------------------------- #
# Model
# ---------------------------------------------------------------------------- #
_C.MODEL = CN()
# "SCRL" or "BYOL" (any name registered in META_ARCH_REGISTRY).
_C.MODEL.META_ARCHITECTURE = "SCRL"
# "cuda" falls back to "cpu" with a warning when no GPU is visible.
_C.MODEL.DEVICE = "cuda"
# Optional initial weights for the online encoder (our checkpoint or a torchvision
# ResNet state dict). Empty: random initialisation.
_C.MODEL.WEIGHTS = ""
# Input normalisation, RGB, 0-255 scale (= ImageNet mean/std of torchvision).
# The data pipeline yields uint8 views; the model normalises on the device.
_C.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
_C.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
_C.MODEL.CHANNELS_LAST = True
# torch.compile of the model's forward and loss (first steps are slow while it compiles;
# a changing number of valid box pairs is handled as a dynamic shape).
_C.MODEL.COMPILE = CN()
_C.MODEL.COMPILE.ENABLED = False
_C.MODEL.COMPILE.MODE = "default"  # "default", "reduce-overhead", "max-autotune"
_C.MODEL.COMPILE.BACKEND = "inductor"

_C.MODEL.BACKBONE = CN()
_C.MODEL.BACKBONE.NAME = "build_resnet_backbone"
_C.MODEL.BACKBONE.FREEZE_AT = 0

_C.MODEL.RESNETS = CN()
_C.MODEL.RESNETS.DEPTH = 50  # 18, 34, 50, 101, 152
_C.MODEL.RESNETS.OUT_FEATURES = ["res5"]
_C.MODEL.RESNETS.NUM_GROUPS = 1
_C.MODEL.RESNETS.WIDTH_PER_GROUP = 64
# "BN", "SyncBN", "FrozenBN", "GN" or "" (none); Detectron2's names. "SyncBN" is the
# release: on several processes every BatchNorm (online, target, heads) takes its
# statistics from the global batch; on one process it is BN. CPU processes synchronise too.
_C.MODEL.RESNETS.NORM = "SyncBN"
# False = stride in the 3x3 conv (torchvision's ResNet v1.5, what SCRL pretrains).
_C.MODEL.RESNETS.STRIDE_IN_1X1 = False
_C.MODEL.RESNETS.RES5_DILATION = 1
_C.MODEL.RESNETS.RES2_OUT_CHANNELS = 256  # must be 64 for depth 18/34
_C.MODEL.RESNETS.STEM_OUT_CHANNELS = 64

# Heads and EMA, shared by BYOL and SCRL.
_C.MODEL.BYOL = CN()
_C.MODEL.BYOL.PROJECTOR_HIDDEN_DIM = 4096
_C.MODEL.BYOL.PROJECTION_DIM = 256
_C.MODEL.BYOL.PREDICTOR_HIDDEN_DIM = 4096
# Normalisation in the projector / predictor MLPs: "BN" or "SyncBN" (the release).
_C.MODEL.BYOL.HEAD_NORM = "SyncBN"
# EMA momentum of the target network, cosine-increased from this value to 1.
_C.MODEL.BYOL.BASE_MOMENTUM = 0.97
# The official release initialises the target independently ("random");
# the BYOL paper copies the online weights ("online").
_C.MODEL.BYOL.TARGET_INIT = "random"

# Spatially consistent box pairs and RoI pooling (SCRL only).
_C.MODEL.SCRL = CN()
_C.MODEL.SCRL.NUM_BOXES = 10
_C.MODEL.SCRL.MIN_SIZE = 32
_C.MODEL.SCRL.IOU_THRESHOLD = 0.5
_C.MODEL.SCRL.MAX_TRIES = 50
_C.MODEL.SCRL.GRID_BASED = True
_C.MODEL.SCRL.BOX_JITTER = False
_C.MODEL.SCRL.BOX_JITTER_RATIO = 0.1
# Reproduce the release's box generator before its flip fix (May 2021), which produced
# the released checkpoints and the paper's table: a flipped view's box keeps its
# unflipped right edge, so about 3 in 4 pairs do not cover the same content. Off: the
# fixed generator (right). For reproducing those checkpoints' training or ablating the fix.
_C.MODEL.SCRL.REPRODUCE_FLIP_BUG = False
_C.MODEL.SCRL.POOLER_RESOLUTION = 1
# <= 0: adaptive, as in the release (torchvision -1, Detectron2 0).
_C.MODEL.SCRL.POOLER_SAMPLING_RATIO = 0
_C.MODEL.SCRL.POOLER_ALIGNED = False
# Off for fidelity: the release drops non-overlapping images from the loss. On:
# redraw the second view's crop (up to MAX_CROP_TRIES) until the views overlap.
_C.MODEL.SCRL.REQUIRE_OVERLAP = False
_C.MODEL.SCRL.MAX_CROP_TRIES = 10

# Online linear probe on the detached pooled feature (labelled data only).
_C.MODEL.PROBE = CN()
_C.MODEL.PROBE.ENABLED = False
# 0: taken from the training dataset's metadata.
_C.MODEL.PROBE.NUM_CLASSES = 0

# ---------------------------------------------------------------------------- #
# Input / two-view augmentation (BYOL recipe; view 1, view 2 where two values)
# ---------------------------------------------------------------------------- #
_C.INPUT = CN()
_C.INPUT.FORMAT = "RGB"
_C.INPUT.CROP_SIZE = 224
_C.INPUT.CROP_SCALE = (0.2, 1.0)
_C.INPUT.CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_C.INPUT.INTERPOLATION = "bicubic"
_C.INPUT.FLIP_PROB = 0.5
_C.INPUT.COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)
_C.INPUT.COLOR_JITTER_PROB = 0.8
_C.INPUT.GRAYSCALE_PROB = 0.2
# "resize" (the release's cheap down-and-up bicubic resize) or "gaussian".
_C.INPUT.BLUR_TYPE = "resize"
_C.INPUT.BLUR_PROB = (1.0, 0.1)
_C.INPUT.RESIZE_BLUR_FACTORS = (1.1, 1.2, 1.5)
# Gaussian blur: kernel = this fraction of the crop size, sigma uniform in range.
_C.INPUT.GAUSSIAN_BLUR_KERNEL_FRACTION = 0.1
_C.INPUT.GAUSSIAN_BLUR_SIGMA = (0.1, 2.0)
_C.INPUT.SOLARIZE_PROB = (0.0, 0.2)
_C.INPUT.SOLARIZE_THRESHOLD = 128
# Decode a JPEG at 1/2, 1/4 or 1/8 scale when both crops keep at least CROP_SIZE pixels
# per side (libjpeg DCT scaling: large photographs decode several times faster).
_C.INPUT.JPEG_DRAFT = True
# Turn images as their EXIF orientation tag says (Detectron2's read_image does; the
# detection datasets always do). Off: the stored pixels, as the release read ImageNet.
_C.INPUT.EXIF_TRANSPOSE = False
# Where views are decoded and augmented, every random parameter drawn in the loader
# workers either way: "cpu" (the workers render the views with PIL), "split" (the workers
# decode with PIL, crop, resize (torch's antialiased uint8 bicubic where the crop falls on
# whole pixels, PIL's otherwise) and flip; the training device applies the colour jitter,
# grayscale, blur and solarize of the same parameters, batched: about a third of the CPU
# work per image) or "device" (the workers only read the files; nvJPEG decode and every
# operation on the device). For when CPU cores cannot feed the GPU, see docs/performance.md.
_C.INPUT.AUGMENT_DEVICE = "cpu"
AUGMENT_DEVICES = ("cpu", "split", "device")  # its values (checked by check_config)

# ---------------------------------------------------------------------------- #
# Datasets: names registered in scrl_d2.data.DatasetCatalog, or "images:PATH"
# (any folder of images, recursive, unlabelled) / "classes:PATH" (class sub-folders).
# ---------------------------------------------------------------------------- #
_C.DATASETS = CN()
_C.DATASETS.TRAIN = ("imagenet_train",)
_C.DATASETS.TEST = ()
# Root of the standard layouts (imagenet/, coco/); empty: $SCRL_DATASETS, then
# $DETECTRON2_DATASETS, then ./datasets.
_C.DATASETS.ROOT = ""
# The folder listing (dataset index) is made once per job by the main process and
# cached in OUTPUT_DIR/dataset_index/ (reused while the folders' modification times
# hold); False: no cache file (the main process still lists alone).
_C.DATASETS.INDEX_CACHE = True

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 8
_C.DATALOADER.PIN_MEMORY = True
_C.DATALOADER.PERSISTENT_WORKERS = True
_C.DATALOADER.PREFETCH_FACTOR = 2

# ---------------------------------------------------------------------------- #
# Solver
# ---------------------------------------------------------------------------- #
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = "LARS"  # "LARS" or "SGD"
# Scaled by the global batch / 256 (IMS_PER_GPU x number of processes / 256).
_C.SOLVER.BASE_LR = 0.45
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = False
_C.SOLVER.WEIGHT_DECAY = 1e-6
_C.SOLVER.LARS_TRUST_COEF = 0.001
_C.SOLVER.LARS_EPS = 1e-8
# Exclude normalisation parameters and biases from LARS adaptation and weight decay.
_C.SOLVER.LARS_EXCLUDE_NORM_AND_BIAS = True
# Images per process (the release's batch_size_train), not global.
_C.SOLVER.IMS_PER_GPU = 256
_C.SOLVER.EPOCHS = 200
_C.SOLVER.WARMUP_EPOCHS = 10
# > 0: stop after this many iterations (schedules still span SOLVER.EPOCHS).
_C.SOLVER.MAX_ITER = 0
# Write checkpoint_{epoch}.pth every this many epochs (and at the last epoch).
_C.SOLVER.SNAPSHOT_INTERVAL = 20
# Keep only the newest this many checkpoint_{epoch}.pth files (0: all); checkpoint_best.pth
# and the one checkpoint_last.pth names are always kept.
_C.SOLVER.SNAPSHOT_MAX_TO_KEEP = 0
# Detectron2's key and meaning: also save a checkpoint after every this number of
# iterations (model_{iter:07d}.pth, resumable mid-epoch); 0: epoch checkpoints only.
_C.SOLVER.CHECKPOINT_PERIOD = 0
# Keep only the newest this many model_{iter:07d}.pth files (0: all).
_C.SOLVER.CHECKPOINT_MAX_TO_KEEP = 2
_C.SOLVER.AMP = CN()
_C.SOLVER.AMP.ENABLED = True
# "auto": bfloat16 where supported, else float16 with a gradient scaler.
_C.SOLVER.AMP.DTYPE = "auto"
# DistributedDataParallel (several processes).
_C.SOLVER.DDP = CN()
# Every parameter gets a gradient every step (also in steps without box pairs), so
# DDP may treat the graph as static: bucket order and rebuilds are fixed once.
_C.SOLVER.DDP.STATIC_GRAPH = True
_C.SOLVER.DDP.BUCKET_CAP_MB = 25
_C.SOLVER.DDP.GRADIENT_AS_BUCKET_VIEW = True

# ---------------------------------------------------------------------------- #
# Evaluation during pretraining
# ---------------------------------------------------------------------------- #
_C.TEST = CN()
# Evaluate the online probe on DATASETS.TEST every this many epochs (0: never).
_C.TEST.EVAL_PERIOD = 5
_C.TEST.IMS_PER_GPU = 256

# ---------------------------------------------------------------------------- #
# Offline linear evaluation (the release's protocol): a linear classifier on the frozen
# backbone's pooled feature, trained on DATASETS.TRAIN, top-1 on DATASETS.TEST[0].
# ---------------------------------------------------------------------------- #
_C.LINEAR_EVAL = CN()
# Run after pretraining (and with --eval-only).
_C.LINEAR_EVAL.ENABLED = True
_C.LINEAR_EVAL.EPOCHS = 80
_C.LINEAR_EVAL.WARMUP_EPOCHS = 5
# Scaled by the global batch / 256: 0.2 for SCRL checkpoints, 0.05 for BYOL (release).
_C.LINEAR_EVAL.BASE_LR = 0.2
# "LARS" (the release: SGD-nesterov wrapped in LARS, every parameter adapted) or "SGD".
_C.LINEAR_EVAL.OPTIMIZER = "LARS"
_C.LINEAR_EVAL.MOMENTUM = 0.9
_C.LINEAR_EVAL.NESTEROV = True
_C.LINEAR_EVAL.WEIGHT_DECAY = 0.0
_C.LINEAR_EVAL.IMS_PER_GPU = 128
_C.LINEAR_EVAL.CROP_SCALE = (0.08, 1.0)
# Evaluate top-1 every this many epochs (and at the last one).
_C.LINEAR_EVAL.EVAL_PERIOD = 5
# Train the backbone too (fine-tuning variant) instead of freezing it.
_C.LINEAR_EVAL.FINETUNE = False
# Extract centre-crop features once and train on them (no augmentation; much faster;
# results are labelled "precomputed-features" in linear_eval.json).
_C.LINEAR_EVAL.PRECOMPUTE_FEATURES = False
# "online" or "target" encoder of our checkpoints / the release's.
_C.LINEAR_EVAL.ENCODER = "online"

# Weighted k-NN monitor on pooled features (InstDisc-style weights exp(sim / T)).
_C.KNN = CN()
# Every this many pretraining epochs (0: never); also run with --eval-only when > 0.
_C.KNN.PERIOD = 0
_C.KNN.K = 200
_C.KNN.TEMPERATURE = 0.07

# Evaluate a randomly initialised encoder of the same architecture (seeded by SEED, else 0)
# with the same k-NN and linear evaluation, and print its top-1 beside each of them: a
# representation figure means little without its no-pretraining baseline (the demo's is on).
_C.TEST.RANDOM_BASELINE = False

# ---------------------------------------------------------------------------- #
# Misc
# ---------------------------------------------------------------------------- #
# Empty: ./output/<config name>_<n>, numbered to the first unused n.
_C.OUTPUT_DIR = ""
# Resume from this directory's newest checkpoint instead of OUTPUT_DIR's.
_C.LOAD_DIR = ""
# < 0: a random seed is drawn (and logged) so runs can be reproduced.
_C.SEED = -1
# Log metrics every this many iterations.
_C.LOG_PERIOD = 20
_C.CUDNN_BENCHMARK = True
