"""Pictures of Grad-CAM word maps: an overlay that keeps the image's colours, and a labelled grid.

* :func:`overlay`: the image upsampled by an integer factor (nearest neighbour: the pixels stay
  sharp) with the map upsampled bilinearly, divided by its maximum (0 stays 0, so a map that is
  zero everywhere draws nothing), coloured blue -> red and blended with an opacity that grows
  with the value: ``out = (1 - a h) image + a h jet(h)``, ``a = max_alpha``. Where the map is
  zero the image's pixels are unchanged (a uniform 50 % blend washes every colour out).
* :func:`gradcam_grid`: the image, then one overlay per token titled with the token, with the
  caption, ITM logit and layer above and a colour bar; a PNG via matplotlib's Agg canvas.

Example::

    >>> cams, logit = itm_gradcam(model, images, ids, mask)
    >>> gradcam_grid(image, cams[0], tokens, 'grid.png', title='"a red circle ..."  ITM logit 3.2')
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ['display_scale', 'heat_map', 'jet', 'overlay', 'gradcam_grid']


def display_scale(side: int, size: int = 224) -> int:
    """The integer upsampling factor that brings ``side`` pixels to about ``size`` (at least 1)."""
    return max(1, int(round(size / max(1, side))))


def jet(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) floats in [0, 1], blue (0) through green to red (1)."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def heat_map(cam: torch.Tensor, height: int, width: int) -> np.ndarray:
    """``cam`` (h, w) >= 0 upsampled bilinearly to (height, width) and divided by its maximum."""
    heat = torch.nn.functional.interpolate(cam[None, None].float(), size=(height, width), mode='bilinear',
                                           align_corners=False)[0, 0].clamp(min=0)
    peak = heat.max()
    return (heat / peak if peak > 0 else heat).numpy()


def overlay(image: torch.Tensor, cam: torch.Tensor, scale: Optional[int] = None,
            max_alpha: float = 0.6) -> Image.Image:
    """``image`` (3, H, W) in [0, 1], upsampled ``scale`` times (default: to about 224 px), with
    ``cam`` (h, w) on top; pixels where the map is 0 keep the image's colour exactly."""
    if image.dim() != 3 or image.shape[0] != 3 or cam.dim() != 2:
        raise ValueError(f'overlay needs image (3, H, W) and cam (h, w), got {tuple(image.shape)}, {tuple(cam.shape)}')
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(f'max_alpha must be in [0, 1], got {max_alpha}')
    scale = display_scale(image.shape[-1]) if scale is None else scale
    base = image.detach().float().clamp(0, 1).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    base = base.permute(1, 2, 0).numpy()
    heat = heat_map(cam.detach().cpu(), base.shape[0], base.shape[1])
    alpha = (max_alpha * heat)[..., None]
    blended = (1.0 - alpha) * base + alpha * jet(heat)
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def gradcam_grid(image: torch.Tensor, cams: torch.Tensor, tokens: Sequence[str], path: str, title: str = '',
                 columns: int = 6, scale: Optional[int] = None) -> List[str]:
    """Write the labelled grid of ``image`` (3, H, W) in [0, 1] and the overlay of each of the T
    ``tokens``' maps ``cams`` (T, h, w); returns the panel labels."""
    from vlp_codebook.analysis.plots import new_figure, save_figure
    if len(tokens) != cams.shape[0]:
        raise ValueError(f'{len(tokens)} tokens but {cams.shape[0]} maps')
    scale = display_scale(image.shape[-1]) if scale is None else scale
    labels = ['image'] + list(tokens)
    rows = -(-len(labels) // columns)
    figure = new_figure(2.0 * columns + 0.8, 2.15 * rows + 0.7)
    grid = figure.add_gridspec(rows, columns + 1, width_ratios=[1.0] * columns + [0.08])
    pictures = [overlay(image, torch.zeros(1, 1), scale)] + [overlay(image, cam, scale) for cam in cams]
    for index, (label, picture) in enumerate(zip(labels, pictures)):
        axes = figure.add_subplot(grid[index // columns, index % columns])
        axes.imshow(np.asarray(picture), interpolation='nearest')
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(label, fontsize=11, fontweight='bold' if index else 'normal')
    colour_bar = figure.add_subplot(grid[:, columns])
    colour_bar.imshow(jet(np.linspace(1, 0, 256)[:, None].repeat(8, 1)), aspect='auto')
    colour_bar.set_xticks([])
    colour_bar.set_yticks([0, 255])
    colour_bar.set_yticklabels(['max', '0'], fontsize=8)
    colour_bar.yaxis.tick_right()
    colour_bar.set_title('map /\nits max', fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    save_figure(figure, path)
    return labels
