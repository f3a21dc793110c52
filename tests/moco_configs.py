"""MoCo's published detection configs, as values: the references the MoCo C4 protocols name
(``Protocol.reference``). Source: github.com/facebookresearch/moco, detection/configs/, at
90e244a23d135e8facca41f8aa47541cc30c61b2 (initial release, 2020-03-22: NORM SyncBN) and
d00ef73a485a23918b92541abb61721c33eb091f (2020-11-04, "use naiveSyncBN for moco"; the files
are unchanged from there to 34020351524e9869f76cbb81fadcdb77caa32f7b, 2024-08-13). Each dict
holds the keys one file sets; MoCo's files have no Detectron2 ``_BASE_``, so every other key
is Detectron2's ``get_cfg()`` default.
"""

# detection/configs/Base-RCNN-C4-BN.yaml @ 90e244a
_BASE_C4_BN = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.NORM": "SyncBN",
    "TEST.PRECISE_BN.ENABLED": True,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
}
# detection/configs/Base-RCNN-C4-BN.yaml @ d00ef73: the one changed value
_NAIVE = {"MODEL.RESNETS.NORM": "naiveSyncBN"}
# detection/configs/coco_R_50_C4_2x.yaml (same at both commits)
_COCO_2X = {
    "MODEL.MASK_ON": True,
    "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    "INPUT.MIN_SIZE_TRAIN": (640, 672, 704, 736, 768, 800),
    "INPUT.MIN_SIZE_TEST": 800,
    "DATASETS.TRAIN": ("coco_2017_train",),
    "DATASETS.TEST": ("coco_2017_val",),
    "SOLVER.STEPS": (120000, 160000),
    "SOLVER.MAX_ITER": 180000,
}
# detection/configs/pascal_voc_R_50_C4_24k.yaml (same at both commits)
_VOC_24K = {
    "MODEL.MASK_ON": False,
    "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    "MODEL.ROI_HEADS.NUM_CLASSES": 20,
    "INPUT.MIN_SIZE_TRAIN": (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
    "INPUT.MIN_SIZE_TEST": 800,
    "DATASETS.TRAIN": ("voc_2007_trainval", "voc_2012_trainval"),
    "DATASETS.TEST": ("voc_2007_test",),
    "SOLVER.STEPS": (18000, 22000),
    "SOLVER.MAX_ITER": 24000,
    "SOLVER.WARMUP_ITERS": 100,
}
# detection/configs/coco_R_50_C4_2x_moco.yaml and pascal_voc_R_50_C4_24k_moco.yaml (the same
# values, on top of the file above; same at both commits)
_MOCO_INPUT = {
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "MODEL.WEIGHTS": "See Instructions",
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "INPUT.FORMAT": "RGB",
}

_REPO = "facebookresearch/moco"
# reference name (as protocols.py writes it) -> the files' values, in _BASE_ order
MOCO_CONFIGS = {
    f"{_REPO}@90e244a:detection/configs/coco_R_50_C4_2x_moco.yaml": (_BASE_C4_BN, _COCO_2X, _MOCO_INPUT),
    f"{_REPO}@90e244a:detection/configs/pascal_voc_R_50_C4_24k_moco.yaml": (_BASE_C4_BN, _VOC_24K, _MOCO_INPUT),
    f"{_REPO}@d00ef73:detection/configs/coco_R_50_C4_2x_moco.yaml": (_BASE_C4_BN, _NAIVE, _COCO_2X, _MOCO_INPUT),
    f"{_REPO}@d00ef73:detection/configs/pascal_voc_R_50_C4_24k_moco.yaml":
        (_BASE_C4_BN, _NAIVE, _VOC_24K, _MOCO_INPUT),
}
