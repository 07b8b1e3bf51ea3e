"""ediffi-jax: a JAX/Flax NNX reimplementation of NVIDIA's eDiff-I (arXiv 2211.01324)."""

from setuptools import find_packages, setup

setup(
    name="ediffi_jax",
    version="0.1.0",
    description="eDiff-I text-to-image diffusion (EDM, expert denoisers, paint-with-words) in JAX / Flax NNX",
    packages=find_packages(include=["ediffi_jax", "ediffi_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml_collections==1.1.0",
        "tensorflow-datasets==4.9.10",
        "grain==0.2.18",
        "array_record==0.8.6",
        "transformers==5.24.0",
        "tokenizers==0.23.3",
        "sentencepiece==0.2.3",
        "protobuf==7.36.2",
        "pillow==13.0.0",
        "numpy==2.4.6",
        "tqdm==4.70.1",
        "tensorboardX==2.6.5",
        "scipy==1.17.1",  # FID: matrix square root in float64 (ediffi_jax/eval/fid.py)
    ],
    extras_require={
        # torch (CPU build) is the reference implementation in parity tests only. The pytorch-fid reference is not
        # here: see tests/reference-requirements.txt (installed apart, it would break transformers' torch CLIP).
        "test": ["pytest==9.2.0", "ruff==0.17.6", "torch==2.13.0",
                 # tests/test_notebook.py executes notebooks/quickstart.ipynb in a kernel of this venv
                 "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"],
    },
    entry_points={
        "console_scripts": [
            "ediffi-train=ediffi_jax.cli.train:main",
            "ediffi-sample=ediffi_jax.cli.sample:main",
            "ediffi-export=ediffi_jax.cli.export:main",
            "ediffi-embed=ediffi_jax.cli.embed:main",
            "ediffi-expert-tree=ediffi_jax.cli.expert_tree:main",
            "ediffi-plan=ediffi_jax.cli.plan:main",
            "ediffi-eval=ediffi_jax.cli.eval:main",
            "ediffi-data=ediffi_jax.cli.data:main",
        ]
    },
)
