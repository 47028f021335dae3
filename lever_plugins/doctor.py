"""``lever-plugins doctor``: what is installed, whether LAVIS imports, and how to fix it."""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import platform
import sys
import time
from typing import Callable

# distribution name -> import name
PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "transformers": "transformers",
    "timm": "timm",
    "numpy": "numpy",
    "salesforce-lavis": "lavis",
    "omegaconf": "omegaconf",
    "opencv-python-headless": "cv2",
    "fairscale": "fairscale",
    "decord": "decord",
    "spacy": "spacy",
    "webdataset": "webdataset",
    "iopath": "iopath",
    "einops": "einops",
    "pandas": "pandas",
    "pycocoevalcap": "pycocoevalcap",
    "click": "click",
    "pyyaml": "yaml",
}

FIXES = {
    "salesforce-lavis": "pip install --no-deps salesforce-lavis==1.0.2",
    "opencv-python-headless": "pip install opencv-python-headless",
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if dist == "opencv-python-headless":
            try:
                return metadata.version("opencv-python")
            except metadata.PackageNotFoundError:
                return None
        return None


def report(echo: Callable[[str], None] = print) -> bool:
    """Print the environment report; True when everything needed imports."""
    from lever_plugins import __version__

    ok = True
    echo(f"lever-plugins {__version__} on Python {platform.python_version()} ({sys.executable})")
    for dist in PACKAGES:
        version = _version(dist)
        if version is None:
            ok = False
            echo(f"  MISSING  {dist:<24} fix: {FIXES.get(dist, f'pip install {dist}')}")
        else:
            echo(f"  ok       {dist:<24} {version}")
    transformers_version = _version("transformers") or "?"
    stack = "legacy (LAVIS's own pins)" if transformers_version.startswith("4.2") else "modern"
    echo(f"  stack: {stack}, transformers {transformers_version}")
    try:
        import torch

        echo(f"  torch devices: cuda available={torch.cuda.is_available()}"
             + (f" ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    except Exception as exc:  # pragma: no cover - reported, not raised
        echo(f"  torch does not import: {exc}")
        ok = False
    from lever_plugins import _startup, catalog

    if _startup.installed():
        echo("  startup hook: active (lever_plugins_startup.pth): `import lever_plugins.registry` may go anywhere "
             "among a LAVIS train.py's imports")
    else:
        why = (f"{_startup.DISABLE_ENV} is set" if os.environ.get(_startup.DISABLE_ENV, "").strip() not in ("", "0")
               else "lever_plugins_startup.pth is not in site-packages")
        echo(f"  startup hook: off ({why}): in a LAVIS train.py, `import lever_plugins.registry` must come before "
             "the first lavis import on transformers >= 4.56; fix: pip install -e . (setuptools >= 64) or pip install .")
    external = catalog.external_plugins()
    if external:
        packages = sorted({spec.origin.split(",")[0] for spec in external})
        echo(f"  plugin packages: {len(external)} plugins from {', '.join(packages)}")
    for line in catalog.plugin_load_errors():
        ok = False
        echo(f"  BROKEN   {line}")
    start = time.time()
    try:
        from lever_plugins.compat import import_lavis, install_transformers_shim

        added = install_transformers_shim()
        import_lavis()
        importlib.import_module("lever_plugins.registry")
        added = list(dict.fromkeys(added + _startup.ADDED))
        shim = f"shim re-exposed {', '.join(added)}" if added else "no shim needed"
        echo(f"  LAVIS imports ({time.time() - start:.1f} s; {shim}); lever_plugins.registry registered all plugins")
    except Exception as exc:
        ok = False
        echo(f"  LAVIS does NOT import: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        if "numpy" in str(exc).lower() or "_ARRAY_API" in str(exc):
            echo("    fix (legacy stack): pip install 'numpy<2' 'pandas<2.3' 'scikit-image<0.25' 'pyarrow<18'")
        else:
            echo("    fix: pip install -e . && pip install --no-deps salesforce-lavis==1.0.2")
    echo("OK" if ok else "problems found (see fixes above)")
    return ok
