"""Gate heat-maps: valid PNGs of the right size, peak drawn where the gate peaks, atomic writes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lever_plugins.modules.gated_fusion import GatedFusionModule
from lever_plugins.visualize import SCALE_WIDTH, render_gate_heatmap, save_gate_heatmaps


def _peaked_gate(rows: int, cols: int, peak: tuple[int, int], has_cls: bool = True) -> torch.Tensor:
    patches = torch.zeros(rows, cols)
    patches[peak] = 1.0
    flat = patches.flatten()
    return torch.cat([torch.tensor([0.5]), flat]) if has_cls else flat


def _luminance(picture: Image.Image) -> np.ndarray:
    rgb = np.asarray(picture.convert("RGB"), dtype=np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114])


def test_writes_valid_pngs_of_the_right_size(tmp_path):
    gates = torch.rand(2, 1 + 16)
    images = torch.rand(2, 3, 64, 48)
    paths = save_gate_heatmaps(gates, images, ["dev-0-1", "dev 0/2"], tmp_path / "maps")
    assert [p.name for p in paths] == ["dev-0-1.png", "dev_0_2.png"]
    for path in paths:
        with Image.open(path) as png:
            assert png.format == "PNG"
            assert png.size == (48 + SCALE_WIDTH, 64)
            png.verify()
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["dev-0-1.png", "dev_0_2.png"]


def test_pil_images_of_different_sizes_without_colorbar(tmp_path):
    images = [Image.new("RGB", (80, 60), (30, 90, 200)), Image.new("L", (33, 47), 128)]
    paths = save_gate_heatmaps(torch.rand(2, 1 + 9), images, ["a", "b"], tmp_path, colorbar=False)
    sizes = []
    for path in paths:
        with Image.open(path) as png:
            sizes.append(png.size)
    assert sizes == [(80, 60), (33, 47)]


@pytest.mark.parametrize(
    "rows,cols,peak,size",
    [(4, 4, (1, 2), (64, 64)), (4, 4, (3, 0), (64, 64)), (2, 4, (1, 3), (40, 80)), (16, 16, (5, 11), (224, 224))],
)
def test_brightest_region_is_at_the_peaked_patch(rows, cols, peak, size):
    height, width = size
    image = torch.full((3, height, width), 0.5)
    gate = _peaked_gate(rows, cols, peak)
    grid = None if rows == cols else (rows, cols)
    picture = render_gate_heatmap(gate, image, grid_size=grid, colorbar=False)
    luminance = _luminance(picture)
    y, x = np.unravel_index(np.argmax(luminance), luminance.shape)
    patch_h, patch_w = height / rows, width / cols
    assert int(y // patch_h) == peak[0] and int(x // patch_w) == peak[1]
    # the peaked patch is brighter on average than any other patch
    means = luminance.reshape(rows, height // rows, cols, width // cols).mean(axis=(1, 3))
    assert np.unravel_index(np.argmax(means), means.shape) == peak


def test_cls_token_is_dropped():
    image = torch.full((3, 32, 32), 0.5)
    with_small_cls = _peaked_gate(4, 4, (2, 1))
    with_huge_cls = with_small_cls.clone()
    with_huge_cls[0] = 100.0
    a = np.asarray(render_gate_heatmap(with_small_cls, image, colorbar=False))
    b = np.asarray(render_gate_heatmap(with_huge_cls, image, colorbar=False))
    assert np.array_equal(a, b)
    # Without has_cls, 17 tokens do not form a square grid.
    with pytest.raises(ValueError, match="pass grid_size"):
        render_gate_heatmap(with_small_cls, image, has_cls=False)
    no_cls = _peaked_gate(4, 4, (2, 1), has_cls=False)
    c = np.asarray(render_gate_heatmap(no_cls, image, has_cls=False, colorbar=False))
    assert np.array_equal(a, c)


def test_fixed_scale_keeps_a_flat_gate_flat():
    image = torch.full((3, 32, 32), 0.5)
    gate = torch.full((1 + 16,), 0.5)
    picture = np.asarray(render_gate_heatmap(gate, image, vmin=0.0, vmax=1.0, colorbar=False))
    assert (picture == picture[0, 0]).all()


@pytest.mark.parametrize(
    "gates,images,names,kwargs,message",
    [
        (torch.rand(1, 1 + 15), torch.rand(1, 3, 8, 8), ["a"], {}, "cannot infer a square patch grid from 15"),
        (torch.rand(1, 1 + 16), torch.rand(1, 3, 8, 8), ["a"], {"grid_size": (3, 5)}, "does not match 16"),
        (torch.rand(2, 17), torch.rand(1, 3, 8, 8), ["a", "b"], {}, "same length"),
        (torch.rand(17), torch.rand(1, 3, 8, 8), ["a"], {}, r"gates must be \(B, N\)"),
        (torch.rand(1, 17), torch.randn(1, 3, 8, 8) * 3, ["a"], {}, r"values in \[0, 1\]"),
        (torch.rand(1, 17), torch.rand(1, 4, 8, 8), ["a"], {}, r"must be \(3, H, W\)"),
        (torch.rand(2, 17), torch.rand(2, 3, 8, 8), ["x/y", "x y"], {}, "distinct file names"),
        (torch.full((1, 17), float("nan")), torch.rand(1, 3, 8, 8), ["a"], {}, "NaN"),
    ],
)
def test_bad_input_raises_clear_errors(tmp_path, gates, images, names, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_gate_heatmaps(gates, images, names, tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    image = torch.rand(1, 3, 16, 16)
    (first,) = save_gate_heatmaps(torch.rand(1, 17), image, ["ref"], tmp_path)
    before = first.read_bytes()

    def broken_save(self, fp, format=None, **params):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_gate_heatmaps(torch.rand(1, 17), image, ["ref"], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.png"]
    assert first.read_bytes() == before


def test_gates_from_the_module_render(tmp_path):
    module = GatedFusionModule(32, text_width=24, num_heads=4, alpha_init=1.0)
    image_tokens = torch.randn(2, 1 + 7 * 7, 32)
    text = torch.randn(2, 5, 24)
    _, gates = module(image_tokens, text, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), return_gate=True)
    paths = save_gate_heatmaps(gates, torch.rand(2, 3, 56, 56), ["p0", "p1"], tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_gate_panel_puts_reference_and_target_side_by_side_on_a_fixed_scale():
    from lever_plugins.visualize import render_gate_panel

    reference, target = Image.new("RGB", (64, 64), (200, 200, 200)), Image.new("RGB", (64, 64), (0, 0, 255))
    low, high = np.full(1 + 16, 0.45), np.full(1 + 16, 0.55)
    with_target = render_gate_panel(low, reference, "make it blue", target, grid_size=4)
    alone = render_gate_panel(low, reference, "make it blue", grid_size=4)
    assert with_target.width >= alone.width + 64 and with_target.height > 64
    # one fixed scale for every panel: a gate of 0.55 is drawn brighter than 0.45, not both as the extremes
    a = np.asarray(render_gate_panel(low, reference, "t", grid_size=4), dtype=float)
    b = np.asarray(render_gate_panel(high, reference, "t", grid_size=4), dtype=float)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="vmax"):
        render_gate_panel(low, reference, "t", grid_size=4, vmin=1.0, vmax=0.0)


def test_save_gate_maps_writes_a_panel_per_query_and_their_grid(tmp_path):
    from lever_plugins.visualize import save_gate_maps

    pictures = [Image.new("RGB", (32, 32), (i * 60, 0, 0)) for i in range(3)]
    paths = save_gate_maps(torch.rand(3, 1 + 16), pictures, ["a", "b", "c"], ["q0", "q1", "q2"], tmp_path,
                           targets=pictures, grid_size=4, alpha=0.1, columns=2)
    assert [p.name for p in paths] == ["q0.png", "q1.png", "q2.png", "grid.png"]
    with Image.open(paths[0]) as panel, Image.open(paths[-1]) as grid:
        assert grid.width >= 2 * panel.width and grid.height >= 2 * panel.height
    with pytest.raises(ValueError, match="same length"):
        save_gate_maps(torch.rand(2, 17), pictures, ["a", "b"], ["x", "y"], tmp_path, grid_size=4)
    with pytest.raises(ValueError, match="other than 'grid'"):
        save_gate_maps(torch.rand(1, 17), pictures[:1], ["a"], ["grid"], tmp_path, grid_size=4)
