"""Installable package; `pip install -e .` (scripts/setup.sh does it inside .venv)."""

from setuptools import find_packages, setup

setup(
    name="megdet_hpc",
    version="0.1.0",
    description="MegDet-style large mini-batch detection training with Cross-GPU BatchNorm on SLURM/MPI",
    packages=find_packages(include=["megdet_hpc", "megdet_hpc.*"]),
    # configs/ ships inside the package (megdet_hpc/configs is a link to it): a wheel can train.
    package_data={"megdet_hpc": ["launch/templates/*.sh.in", "configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "pycocotools>=2.0.7",
        "PyYAML>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "mpi": ["mpi4py>=4.0"],
        "slurm": ["submitit>=1.5"],
        "tensorboard": ["tensorboard>=2.15"],
        # Horovod 0.28.1 needs the patched build in scripts/build_horovod.sh for torch >= 2.1.
    },
    entry_points={
        "console_scripts": [
            "megdet-train=megdet_hpc.train:main",
            "megdet-evaluate=megdet_hpc.evaluate:main",
            "megdet-launch=megdet_hpc.launch.__main__:main",
            "megdet-plan=megdet_hpc.plan:main",
            "megdet-visualize=megdet_hpc.visualize:main",
        ]
    },
)
