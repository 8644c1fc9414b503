from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="vit-slurm",
    version="0.1.0",
    description="Slurm job toolkit for pretraining and fine-tuning ViT-H/14 with FSDP2",
    # hydra_plugins is a namespace package shared with hydra-submitit-launcher: Hydra finds launchers there.
    packages=find_packages(include=["vit", "vit.*"]) + find_namespace_packages(include=["hydra_plugins.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # first release with the public FSDP2 `torch.distributed.fsdp.fully_shard`
        "torchvision",
        "timm>=1.0",
        "submitit>=1.5",
        "hydra-core>=1.3",
        "hydra-submitit-launcher>=1.2",
        "numpy",
        "pyyaml",
        "pillow",
        "safetensors",
        "pycocotools>=2.0.11",  # COCO box AP; 2.0.9 and 2.0.10 fail on annotations without "info"
        "tqdm",
        "matplotlib",  # jobs/status.py --plot
    ],
    # tensorboard is optional for users (jobs/status.py --tensorboard says when it is missing); the tests use it
    # torchao: train.float8 only; 0.18.0 is the release tested with torch 2.14 (its float8 API moves)
    extras_require={"dev": ["pytest>=7", "tensorboard", "torchao==0.18.0"], "tensorboard": ["tensorboard"],
                    "float8": ["torchao==0.18.0"]},
)
