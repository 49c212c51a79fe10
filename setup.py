"""dpmjax: fast diffusion-model samplers, gradients through sampling, and training, in JAX/Flax."""
from setuptools import find_packages, setup

# the documentation site: `pip install -e ".[docs]" && mkdocs serve` (mkdocs.yml says why this stack)
DOCS = ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings>=0.26,<2", "mkdocstrings-python>=1.10,<3",
        "mkdocs-jupyter>=0.25,<1"]

setup(
    name="dpmjax",
    version="0.1.0",
    description="JAX/Flax diffusion probabilistic models: fast samplers (DPM-Solver, DPM-Solver++, UniPC, "
                "PNDM, ...), adjoint gradients, training and evaluation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ ships inside the wheel as dpmjax/_configs (a plain `pip install git+...`, e.g. on Colab, has no
    # repository beside the package); an editable install reads the repository's configs/ (dpmjax.config.configs_dir).
    packages=find_packages(include=["dpmjax", "dpmjax.*"]) + ["dpmjax._configs", "dpmjax._configs.methods"],
    package_dir={"dpmjax._configs": "configs", "dpmjax._configs.methods": "configs/methods"},
    package_data={"dpmjax": ["assets/*"], "dpmjax._configs": ["*.py"], "dpmjax._configs.methods": ["*.py"]},
    python_requires=">=3.10",
    # Ranges admit what pip resolves on Python 3.11 today (jax 0.10.x) and the GPU images (jax 0.11.x).
    install_requires=[
        "jax>=0.10.0,<0.12",
        "jaxlib>=0.10.0,<0.12",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "diffrax>=0.7.0,<0.8",
        "ml-collections>=1.0.0,<2",
        "clu>=0.0.12,<0.1",
        "tensorflow-datasets>=4.9.6,<5",
        "grain>=0.2.10,<0.3",
        "scikit-learn>=1.5,<2",
        "matplotlib>=3.8,<4",
        "tqdm>=4.66,<5",
        "numpy>=1.26,<3",
        "scipy>=1.12,<2",
        "safetensors>=0.4,<1",  # reads diffusers checkpoints (numpy API, no torch): dpmjax convert
        # dpmjax serve: Starlette (ASGI routing, small, typed requests) run by uvicorn in one asyncio loop.
        "starlette>=0.40,<2",
        "uvicorn>=0.30,<1",
        "dm-pix>=0.4,<0.5",  # PSNR / SSIM / grayscale of the deblurring metrics (dpmjax.data.blur)
    ],
    extras_require={
        # torch 2.13.0 CPU and diffusers are the parity oracles (diffusers' PyTorch schedulers).
        # httpx: Starlette's test client and the load-test client; nbclient + ipykernel run notebooks/ in the tests
        # (tests/test_notebooks.py); mkdocs builds the documentation site (docs/, `mkdocs build --strict` is a test).
        "test": ["pytest>=8,<10", "torch==2.13.0", "diffusers>=0.35,<0.43", "httpx>=0.27,<1", "nbclient>=0.10,<1",
                 "nbformat>=5.9,<6", "ipykernel>=6.29,<8", *DOCS],
        "docs": DOCS,
        "tf": ["tensorflow-cpu>=2.16,<2.22", "tensorboard>=2.16,<2.22"],
    },
    entry_points={"console_scripts": ["dpmjax=dpmjax.main:main"]},
)
