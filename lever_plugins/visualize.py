"""Gate heat-maps: the per-patch gate of :class:`GatedFusionModule` drawn over the reference image.

``GatedFusionModule(..., return_gate=True)`` returns a gate per image token, ``(B, N)``; for a ViT
the first token is CLS and the rest are the patches in row-major order. Here the patch gates are
reshaped to the patch grid, upsampled bilinearly to the image size, coloured with an inferno-like
map (brighter = larger gate) and blended over the image, with a colour scale on the right.

Needs only numpy and Pillow (no matplotlib); torch tensors are accepted but torch is not imported.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lever_plugins.io import atomic_output

__all__ = ["render_gate_heatmap", "save_gate_heatmaps", "SCALE_WIDTH"]

#: Width in pixels of the colour scale appended to the right of each heat-map.
SCALE_WIDTH = 56

# Anchors of matplotlib's "inferno" map (black -> purple -> orange -> pale yellow); its luminance
# rises monotonically, so the brightest pixel marks the largest gate in print and for colour-blind readers.
_INFERNO = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)

GridSize = Union[int, tuple[int, int], None]


def _colormap(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` values in ``[0, 1]`` -> ``(H, W, 3)`` uint8 colours."""
    positions = np.linspace(0.0, 1.0, len(_INFERNO))
    clipped = np.clip(values, 0.0, 1.0)
    channels = [np.interp(clipped, positions, _INFERNO[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor, without importing torch
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def _patch_grid(gate: np.ndarray, grid_size: GridSize, has_cls: bool) -> np.ndarray:
    """``(N,)`` token gates -> ``(rows, cols)`` patch gates."""
    if gate.ndim != 1:
        raise ValueError(f"gate must be (N,) per image, got shape {gate.shape}")
    patches = gate[1:] if has_cls else gate
    count = patches.shape[0]
    if grid_size is None:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(
                f"cannot infer a square patch grid from {count} patch tokens "
                f"({gate.shape[0]} tokens, has_cls={has_cls}); pass grid_size=(rows, cols)"
            )
        rows, cols = side, side
    elif isinstance(grid_size, int):
        rows, cols = grid_size, grid_size
    else:
        rows, cols = (int(v) for v in grid_size)
    if rows * cols != count:
        raise ValueError(
            f"grid_size {rows}x{cols} = {rows * cols} patches does not match {count} patch tokens "
            f"({gate.shape[0]} tokens, has_cls={has_cls})"
        )
    if not np.isfinite(patches).all():
        raise ValueError("gate contains NaN or inf")
    return patches.reshape(rows, cols)


def _to_pil(image: Any) -> Image.Image:
    """PIL image, or ``(3, H, W)`` tensor/array in ``[0, 1]`` -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = _to_numpy(image)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"image tensors must be (3, H, W) (or (1, H, W)), got shape {array.shape}")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"image tensors must hold values in [0, 1], got [{low:.3g}, {high:.3g}]; "
            "undo the normalisation (e.g. CLIP mean/std) first"
        )
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    pixels = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(pixels)


def _scale_strip(height: int, vmin: float, vmax: float) -> Image.Image:
    """Vertical colour bar (top = ``vmax``) with the two end values written beside it."""
    strip = Image.new("RGB", (SCALE_WIDTH, height), (255, 255, 255))
    bar_width = 14
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(bar_width, axis=1)
    strip.paste(Image.fromarray(_colormap(ramp)), (4, 0))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    draw.text((bar_width + 7, 0), f"{vmax:.3g}", fill=(0, 0, 0), font=font)
    bottom = max(0, height - 12)
    draw.text((bar_width + 7, bottom), f"{vmin:.3g}", fill=(0, 0, 0), font=font)
    return strip


def render_gate_heatmap(
    gate: Any,
    image: Any,
    *,
    grid_size: GridSize = None,
    has_cls: bool = True,
    opacity: float = 0.5,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    colorbar: bool = True,
) -> Image.Image:
    """Render one gate over one image.

    Args:
        gate: ``(N,)`` gate per image token (tensor or array); CLS first when ``has_cls``.
        image: PIL image, or ``(3, H, W)`` tensor/array in ``[0, 1]`` (de-normalised). The patch grid
            is stretched over the whole image, so pass the image as the encoder saw it.
        grid_size: patch grid as ``rows`` (square) or ``(rows, cols)``; inferred as a square if ``None``.
        has_cls: drop the first token before reshaping.
        opacity: weight of the heat-map in the blend, in ``[0, 1]``.
        vmin, vmax: gate values mapped to the ends of the colour map; default the image's min and
            max patch gate (the gate varies little around 0.5 early in training, so a fixed 0..1
            scale would show a flat map).
        colorbar: append a :data:`SCALE_WIDTH`-pixel colour scale on the right.

    Returns:
        RGB image of size ``(W + SCALE_WIDTH, H)`` with a colour bar, else ``(W, H)``.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity!r}")
    grid = _patch_grid(_to_numpy(gate), grid_size, has_cls)
    picture = _to_pil(image)
    width, height = picture.size
    low = float(grid.min()) if vmin is None else float(vmin)
    high = float(grid.max()) if vmax is None else float(vmax)
    if high < low:
        raise ValueError(f"vmax ({high}) must be >= vmin ({low})")
    normalised = (grid - low) / max(high - low, 1e-12)
    upsampled = Image.fromarray(normalised.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    heat = _colormap(np.asarray(upsampled, dtype=np.float64))
    blended = (1.0 - opacity) * np.asarray(picture, dtype=np.float64) + opacity * heat
    overlay = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
    if not colorbar:
        return overlay
    canvas = Image.new("RGB", (width + SCALE_WIDTH, height), (255, 255, 255))
    canvas.paste(overlay, (0, 0))
    canvas.paste(_scale_strip(height, low, high), (width, 0))
    return canvas


def _file_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    if not stem:
        raise ValueError(f"name {name!r} gives an empty file name")
    return stem


def _split_images(images: Any) -> list[Any]:
    if isinstance(images, Image.Image):
        return [images]
    if hasattr(images, "shape") and len(images.shape) == 4:
        return [images[i] for i in range(images.shape[0])]
    if hasattr(images, "shape"):
        raise ValueError(f"image tensors must be (B, 3, H, W), got shape {tuple(images.shape)}")
    return list(images)


def save_gate_heatmaps(
    gates: Any,
    images: Union[Sequence[Any], Any],
    names: Sequence[str],
    out_dir: Union[str, os.PathLike],
    *,
    grid_size: GridSize = None,
    has_cls: bool = True,
    opacity: float = 0.5,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    colorbar: bool = True,
) -> list[Path]:
    """Write one PNG heat-map per image: ``out_dir/<name>.png``.

    Args:
        gates: ``(B, N)`` gate per image token, e.g. the second output of
            ``GatedFusionModule(..., return_gate=True)`` (257 tokens = CLS + 16x16 for ViT-g at 224 px).
        images: ``B`` PIL images, or a ``(B, 3, H, W)`` tensor/array in ``[0, 1]``.
        names: ``B`` distinct file stems (characters outside ``[A-Za-z0-9._-]`` become ``_``).
        out_dir: output folder, created if missing.
        grid_size, has_cls, opacity, vmin, vmax, colorbar: see :func:`render_gate_heatmap`.

    Returns:
        Paths of the written files, in input order. Each file is written to a temporary name and
        renamed, so a crash never leaves a truncated PNG.
    """
    gate_array = _to_numpy(gates)
    if gate_array.ndim != 2:
        raise ValueError(f"gates must be (B, N), got shape {gate_array.shape}")
    image_list = _split_images(images)
    names = list(names)
    if not len(image_list) == len(names) == gate_array.shape[0]:
        raise ValueError(
            f"gates ({gate_array.shape[0]}), images ({len(image_list)}) and names ({len(names)}) "
            "must have the same length"
        )
    stems = [_file_stem(n) for n in names]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"names must give distinct file names; repeated: {duplicates}")

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for gate, image, stem in zip(gate_array, image_list, stems):
        picture = render_gate_heatmap(
            gate, image, grid_size=grid_size, has_cls=has_cls, opacity=opacity, vmin=vmin, vmax=vmax,
            colorbar=colorbar,
        )
        target = directory / f"{stem}.png"
        with atomic_output(target) as temp_name, open(temp_name, "wb") as stream:
            picture.save(stream, format="PNG")
        written.append(target)
    return written
