"""lever-plugins: research plugins for LAVIS / BLIP-2, switched on from YAML recipes.

Install (modern stack, the default):
    pip install -e .                                   # or: pip install -e ".[test]"
    pip install --no-deps salesforce-lavis==1.0.2      # LAVIS's own pins would drag in transformers 4.26
See README.md for the legacy LAVIS environment.
"""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, "lever_plugins", "_version.py"), encoding="utf-8") as handle:
    exec(handle.read(), version)

# What `import lavis` (1.0.2) needs when LAVIS itself is installed with --no-deps (SPEC §8).
LAVIS_RUNTIME = [
    "omegaconf",
    "pandas",
    "iopath",
    "decord",
    "webdataset",
    "opencv-python-headless",
    "fairscale",
    "einops",
    "spacy",
    "pycocoevalcap",
]

setup(
    name="lever-plugins",
    version=version["__version__"],
    description="Gated fusion, SEPS retrieval head and pointer selectors as registered LAVIS plugins",
    long_description=open(os.path.join(here, "README.md"), encoding="utf-8").read() if os.path.exists(os.path.join(here, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lever_plugins", "lever_plugins.*"]),
    package_data={"lever_plugins": ["configs/*.txt", "configs/models/*.yaml", "configs/datasets/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=1.13",
        "torchvision",
        "transformers>=4.26,<5",
        "timm>=0.4.12",
        "click>=8",
        "pyyaml>=5.4",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",
        *LAVIS_RUNTIME,
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout"],
        "dev": ["pytest>=7", "pytest-timeout", "ruff"],
    },
    entry_points={"console_scripts": ["lever-plugins=lever_plugins.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
