"""scrl_d2: SCRL / BYOL self-supervised pretraining for object detection."""
from setuptools import find_packages, setup

setup(
    name="scrl_d2",
    version="0.1.0",
    description="Spatially Consistent Representation Learning (SCRL) and BYOL pretraining, "
    "integrated with Detectron2",
    python_requires=">=3.9",
    packages=find_packages(include=["scrl_d2", "scrl_d2.*"]),
    package_data={"scrl_d2.detection": ["coco_train2017_subsets.json"]},
    # Loose lower bounds for users; requirements.txt pins the tested environment.
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "numpy",
        "Pillow>=9.0",
        "PyYAML",
        "tabulate",
        "tensorboard",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=7"], "coco": ["pycocotools>=2.0.6"],
                    # tools/submit_slurm.py (SLURM submission, preemption and requeue)
                    "slurm": ["submitit>=1.5"],
                    # tools/transfer.py --study (Student-t intervals, the figure)
                    "study": ["scipy>=1.10", "matplotlib>=3.5"]},
)
