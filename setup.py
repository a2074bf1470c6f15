"""megaflamingo: DeepSpeed training system for Audio Flamingo-style audio-language models.

torch is deliberately unpinned here so GPU clusters keep their CUDA build; CPU machines install
with `-c constraints/cpu.txt` (see scripts/bootstrap.sh), which pins the CPU wheel.
"""
from setuptools import find_packages, setup

setup(
    name="megaflamingo",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 training system for Audio Flamingo-style audio-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # Only the library: the checkout's top-level preprocess/ and tools/ are `python -m` shims, never
    # installed (generic names would clash with other packages in site-packages).
    packages=find_packages(include=["megaflamingo", "megaflamingo.*"]),
    # The DeepSpeed JSONs and stage configs ship inside the package (megaflamingo/resources/ links to the
    # checkout's ds_configs/ and configs/), so an installed package finds them from any directory.
    # The benchmark registry (megaflamingo/eval/*.yaml) is data of the eval package.
    package_data={
        "megaflamingo.resources": ["ds_configs/*.json", "ds_configs/*.md", "configs/*.yaml"],
        "megaflamingo.eval": ["*.yaml"],
    },
    install_requires=[
        "torch>=2.1",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "deepspeed>=0.14",
        "numpy>=2.0",
        "pyarrow>=15",
        "pyyaml>=6",
        "soundfile>=0.12",
        "soxr>=0.3.7",
        "faiss-cpu>=1.8",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "psutil>=5.9",
        "accelerate>=1.1",  # transformers needs it for HfDeepSpeedConfig (ZeRO-3 partitioned LM loading)
    ],
    extras_require={
        # What the real audio encoders' model code imports. laion-clap and msclap themselves are
        # NOT listed: they pin numpy<2 (the core needs numpy>=2 for pyarrow) and pull torchaudio /
        # torchvision, so no resolver can satisfy them here. scripts/install_cluster.sh (and
        # bootstrap.sh on CPU machines) installs them with --no-deps after this extra.
        "encoders": [
            "torchlibrosa>=0.1.0",
            "librosa>=0.10",
            "h5py",
            "ftfy",
            "braceexpand",
        ],
        # Build prerequisites of flash-attn, which is built against the installed torch/CUDA with
        # `pip install flash-attn --no-build-isolation` (scripts/install_cluster.sh --flash-attn):
        # listed here it would be built in an isolated environment without torch and fail.
        # NVIDIA apex is not on PyPI (the PyPI 'apex' is an unrelated package): see README.
        "gpu": ["ninja", "packaging", "psutil", "einops"],
        # megaflamingo-eval: captioning metrics (needs a Java runtime: apt default-jre-headless) and
        # classification / multi-label metrics.
        "eval": ["pycocoevalcap>=1.2", "scikit-learn>=1.3"],
        "mpi": ["mpi4py>=3.1"],
        # The web demo (megaflamingo-demo). Gradio 6's page and API; its Python client for scripts.
        "demo": ["gradio>=6.0,<7", "gradio_client>=2.0,<3"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "librosa>=0.10",  # tests/bench compare our front end with AF1's librosa loader
            "mpi4py>=3.1",
            # Drives the demo's page in Debian's chromium (never a browser download: see bootstrap.sh).
            "playwright>=1.50",
        ],
    },
    entry_points={
        "console_scripts": [
            "megaflamingo-preprocess=megaflamingo.cli.preprocess:main",
            "megaflamingo-train=megaflamingo.cli.train:main",
            "megaflamingo-convert=megaflamingo.cli.convert:main",
            "megaflamingo-infer=megaflamingo.cli.infer:main",
            "megaflamingo-eval=megaflamingo.cli.eval:main",
            "megaflamingo-demo=megaflamingo.cli.demo:main",
        ]
    },
)
