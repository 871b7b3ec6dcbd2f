"""Packaging for minorsft.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but
are installed as ``minorsft.kernels`` (``package_dir``): a top-level import named
``kernels`` would collide with Hugging Face's ``kernels`` package.
"""
from setuptools import setup

setup(
    name="minorsft",
    version="0.1.0",
    description="Fused Triton kernels for reference-model fine-tuning losses "
    "(MinorSFT, MinorDPO, DPO, SFT) with a pure-PyTorch backend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["minorsft", "minorsft.kernels", "minorsft.backends", "minorsft.train", "minorsft.integrations"],
    package_dir={"minorsft": "minorsft", "minorsft.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "safetensors",
        # Triton ships with CUDA builds of torch; CPU-only installs need it for the
        # interpreter. No hardware probing here: it is a plain requirement on Linux.
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.45", "datasets", "matplotlib"],
        "bench": ["matplotlib"],
        "train": ["transformers>=4.45", "datasets", "matplotlib"],
        "hf": ["transformers>=4.45", "datasets", "trl", "accelerate"],
    },
    entry_points={"console_scripts": ["minorsft=minorsft.cli:main"]},
)
