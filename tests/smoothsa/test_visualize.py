"""Pictures: right layout, segment colours where the segments are, a readable GIF."""
import numpy as np
import torch
from PIL import Image

from smoothsa.visualize import MEAN, STD, palette, save_image_grid, save_video_gif


def _scene(b=2, h=32, s=3):
    image = (torch.full((b, 3, h, h), 200.0) - MEAN) / STD
    pred = torch.zeros(b, h, h, s, dtype=torch.bool)
    pred[:, :, : h // 2, 0] = True
    pred[:, :, h // 2 :, 1] = True
    return image, pred.clone(), pred


def test_image_grid_layout_and_colours(tmp_path):
    image, true, pred = _scene()
    path = save_image_grid(tmp_path / "viz" / "grid.png", image, true, pred)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 32, (3 + 3) * 32, 3)
    colours = palette(3)
    left, right = grid[5, 2 * 32 + 5], grid[5, 2 * 32 + 27]  # predicted-segment tile, both halves
    expected_left = (0.4 * 200 + 0.6 * colours[0].astype(float)).astype(np.uint8)
    assert np.abs(left.astype(int) - expected_left).max() <= 1
    assert not np.array_equal(left, right)
    slot0 = grid[:, 3 * 32 : 4 * 32].astype(int)
    assert np.abs(slot0[5, 5] - 200).max() <= 1 and np.abs(slot0[5, 27] - 30).max() <= 1  # its half bright, rest dim
    assert np.abs(grid[:, 5 * 32 :].astype(int) - 30).max() <= 1  # slot 2 wins nothing: all dimmed


def test_video_gif_has_one_frame_per_time_step(tmp_path):
    image, true, pred = _scene()
    moving = lambda x, dim: torch.stack([x.roll(4 * t, dims=dim) for t in range(4)], 1)  # noqa: E731
    video = torch.stack([image] * 4, 1)
    path = save_video_gif(tmp_path / "clip.gif", video, moving(true, 2), moving(pred, 2))
    gif = Image.open(path)
    assert gif.n_frames == 4 and gif.size == (6 * 32, 2 * 32)


def test_palette_colours_are_distinct():
    colours = palette(24).astype(int)
    distances = np.abs(colours[:, None] - colours[None]).sum(-1) + np.eye(24, dtype=int) * 999
    assert distances.min() > 20
