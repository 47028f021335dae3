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

__all__ = ["render_gate_heatmap", "render_gate_panel", "save_gate_heatmaps", "save_gate_maps", "SCALE_WIDTH"]

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


def _distinct_stems(names: Sequence[str], reserved: Optional[str] = None) -> list[str]:
    """File stems of ``names``; a ValueError if two coincide or one is ``reserved`` (another file's name)."""
    stems = [_file_stem(n) for n in names]
    duplicates = sorted({s for s in stems if stems.count(s) > 1} | ({reserved} & set(stems)))
    if duplicates:
        other = f" other than {reserved!r}" if reserved else ""
        raise ValueError(f"names must give distinct file names{other}; repeated: {duplicates}")
    return stems


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
    stems = _distinct_stems(names)

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for gate, image, stem in zip(gate_array, image_list, stems):
        picture = render_gate_heatmap(
            gate, image, grid_size=grid_size, has_cls=has_cls, opacity=opacity, vmin=vmin, vmax=vmax,
            colorbar=colorbar,
        )
        written.append(_save_png(picture, directory / f"{stem}.png"))
    return written


# ---------------------------------------------------------------------------------------------- panels
GATE_LABEL = "gate (share of the text update)"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int, max_lines: int = 2) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(". ") + " ..."
    return lines


def _labelled_colour_bar(height: int, vmin: float, vmax: float, font: ImageFont.ImageFont) -> Image.Image:
    """Colour bar with ticks at both ends and the middle, and the gate's meaning written along it."""
    width = 78
    bar = Image.new("RGB", (width, height), (255, 255, 255))
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(14, axis=1)
    bar.paste(Image.fromarray(_colormap(ramp)), (6, 0))
    draw = ImageDraw.Draw(bar)
    for fraction in (0.0, 0.5, 1.0):
        y = int(round((1.0 - fraction) * (height - 1)))
        value = vmin + fraction * (vmax - vmin)
        draw.line([(20, y), (24, y)], fill=(0, 0, 0))
        draw.text((26, min(max(y - 6, 0), height - 13)), f"{value:.2f}", fill=(0, 0, 0), font=font)
    label = Image.new("RGB", (height, 16), (255, 255, 255))
    ImageDraw.Draw(label).text((2, 1), GATE_LABEL, fill=(60, 60, 60), font=font)
    bar.paste(label.rotate(90, expand=True), (width - 17, 0))
    return bar


def render_gate_panel(
    gate: Any,
    reference: Any,
    text: str,
    target: Any = None,
    *,
    grid_size: GridSize = None,
    has_cls: bool = True,
    vmin: float = 0.0,
    vmax: float = 1.0,
    alpha: Optional[float] = None,
    opacity: float = 0.5,
) -> Image.Image:
    """One query as a person reads it: the modification text as the title, the reference image with
    its per-patch gate overlaid beside the target image, a labelled colour bar on the fixed scale
    ``[vmin, vmax]`` (shared by every panel, so two panels compare), and the gate's actual range in
    this image (and ``alpha``, the update's overall scale) underneath.
    """
    overlay = render_gate_heatmap(gate, reference, grid_size=grid_size, has_cls=has_cls, opacity=opacity,
                                  vmin=vmin, vmax=vmax, colorbar=False)
    width, height = overlay.size
    target_picture = _to_pil(target).resize((width, height)) if target is not None else None
    patches = _patch_grid(_to_numpy(gate), grid_size, has_cls)
    font, title_font = _font(12), _font(14)
    pictures_width = width * (2 if target_picture is not None else 1) + (8 if target_picture is not None else 0)
    bar = _labelled_colour_bar(height, vmin, vmax, font)
    total_width = pictures_width + 8 + bar.width
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = _wrap(probe, f'"{text}"', title_font, total_width - 12)
    top = 8 + 18 * len(title) + 16
    canvas = Image.new("RGB", (total_width, top + height + 24), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(title):
        draw.text((6, 6 + 18 * row), line, fill=(0, 0, 0), font=title_font)
    draw.text((0, top - 15), "reference, gate overlaid", fill=(60, 60, 60), font=font)
    canvas.paste(overlay, (0, top))
    if target_picture is not None:
        draw.text((width + 8, top - 15), "target", fill=(60, 60, 60), font=font)
        canvas.paste(target_picture, (width + 8, top))
    canvas.paste(bar, (pictures_width + 8, top))
    caption = f"gate in this image: {patches.min():.3f} - {patches.max():.3f} (mean {patches.mean():.3f})"
    if alpha is not None:
        caption += f"; alpha {alpha:.3g}"
    draw.text((0, top + height + 6), caption, fill=(0, 0, 0), font=font)
    return canvas


def grid_of(panels: Sequence[Image.Image], columns: int = 4, gap: int = 12) -> Image.Image:
    """Panels in rows of ``columns``, on a white sheet."""
    if not panels:
        raise ValueError("grid_of needs at least one panel")
    cell_w = max(p.width for p in panels)
    cell_h = max(p.height for p in panels)
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    sheet = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap), (255, 255, 255))
    for index, panel in enumerate(panels):
        sheet.paste(panel, ((index % columns) * (cell_w + gap), (index // columns) * (cell_h + gap)))
    return sheet


def save_gate_maps(
    gates: Any,
    references: Sequence[Any],
    texts: Sequence[str],
    names: Sequence[str],
    out_dir: Union[str, os.PathLike],
    *,
    targets: Optional[Sequence[Any]] = None,
    grid_size: GridSize = None,
    has_cls: bool = True,
    vmin: float = 0.0,
    vmax: float = 1.0,
    alpha: Optional[float] = None,
    columns: int = 4,
) -> list[Path]:
    """One :func:`render_gate_panel` PNG per query (``out_dir/<name>.png``) and ``out_dir/grid.png`` with
    all of them; every file written atomically. Returns the per-query paths, then the grid's."""
    gate_array = _to_numpy(gates)
    if gate_array.ndim != 2:
        raise ValueError(f"gates must be (B, N), got shape {gate_array.shape}")
    targets = list(targets) if targets is not None else [None] * len(names)
    if not len(references) == len(texts) == len(names) == len(targets) == gate_array.shape[0]:
        raise ValueError(f"gates ({gate_array.shape[0]}), references ({len(references)}), texts ({len(texts)}), "
                         f"targets ({len(targets)}) and names ({len(names)}) must have the same length")
    stems = _distinct_stems(names, reserved="grid")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    panels, written = [], []
    for gate, reference, text, target, stem in zip(gate_array, references, texts, targets, stems):
        panel = render_gate_panel(gate, reference, text, target, grid_size=grid_size, has_cls=has_cls,
                                  vmin=vmin, vmax=vmax, alpha=alpha)
        panels.append(panel)
        written.append(_save_png(panel, directory / f"{stem}.png"))
    written.append(_save_png(grid_of(panels, columns), directory / "grid.png"))
    return written


def _save_png(picture: Image.Image, target: Path) -> Path:
    with atomic_output(target) as temp_name, open(temp_name, "wb") as stream:
        picture.save(stream, format="PNG")
    return target
