"""lever-plugins: research plugins for LAVIS / BLIP-2, switched on from YAML recipes.

Install (modern stack, the default):
    pip install -e .                                   # or: pip install -e ".[test]"
    pip install --no-deps salesforce-lavis==1.0.2      # LAVIS's own pins would drag in transformers 4.26
See README.md for the legacy LAVIS environment.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

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

# The startup hook (lever_plugins/_startup.py): Python runs this line from site-packages at start-up. It only
# puts an import hook on sys.meta_path that re-exposes LAVIS's three moved transformers helpers right after
# transformers.modeling_utils loads, so `import lever_plugins.registry` may come after LAVIS's own imports.
# Guarded: a stale .pth (package deleted by hand) must never break the interpreter.
STARTUP_PTH = "lever_plugins_startup.pth"
STARTUP_LINE = (
    'import os; exec("try:\\n from lever_plugins import _startup\\nexcept Exception:\\n pass\\n'
    'else:\\n _startup.install()")\n'
)


class build_py(_build_py):
    """Also writes STARTUP_PTH at the top of site-packages, for `pip install .` and `pip install -e .` alike.

    A regular wheel: the top of ``build_lib`` is the wheel's purelib root. A PEP 660 editable wheel
    (setuptools >= 64): ``build_lib`` is a scratch folder, but setuptools points ``install``'s
    ``install_lib`` at the root of the wheel it is packing, which is installed into site-packages.
    (``data_files`` would land in ``sys.prefix``, not in site-packages.)
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, STARTUP_PTH), "w", encoding="utf-8") as handle:
            handle.write(STARTUP_LINE)


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
        # run.loggers trackers (optional; not in `test`: wandb + mlflow-skinny pull ~250 MB and 36 packages)
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "mlflow": ["mlflow-skinny"],
        "dev": ["pytest>=7", "pytest-timeout", "ruff"],
    },
    entry_points={"console_scripts": ["lever-plugins=lever_plugins.cli:main"]},
    cmdclass={"build_py": build_py},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
