"""Pictures of merged tokens (ToMe's group view), drawn with numpy for the Tokens panel.

* image: the picture the model saw, each group of merged patches filled with its
  mean colour and outlined (Bolya et al., 2023, Fig. 4 shows this view);
* text: the tokens as HTML, each merged group in its own colour;
* diffusion: the token grid of one UNet block, one colour per merged group.

Only numpy and Qt's QImage: the GUI thread draws these in a few milliseconds.
"""

from __future__ import annotations

import html
from typing import Optional, Sequence

import numpy as np
from PySide6.QtGui import QImage

_PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
        (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    ],
    dtype=np.uint8,
)


def group_sizes(groups: Sequence[int]) -> dict[int, int]:
    ids, counts = np.unique(np.asarray(groups), return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def _as_qimage(rgb: np.ndarray) -> QImage:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    image = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return image.copy()  # own the pixels: the numpy buffer goes away


def _edges(ids: np.ndarray) -> np.ndarray:
    """True on pixels where the group id changes from the left or upper neighbour."""
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    return edge


def image_groups(image: np.ndarray, groups: Sequence[int], grid: tuple[int, int], *, fill: float = 0.55) -> QImage:
    """``image [H, W, 3]`` uint8 with each merged group of patches (``groups`` per patch, row-major) filled and outlined."""
    gh, gw = grid
    ids = np.asarray(groups, dtype=np.int64).reshape(gh, gw)
    h, w = image.shape[:2]
    ph, pw = h // gh, w // gw
    out = image[: ph * gh, : pw * gw].astype(np.float32)
    cells = out.reshape(gh, ph, gw, pw, 3).transpose(0, 2, 1, 3, 4)  # a view: [gh, gw, ph, pw, 3]
    for gid, size in group_sizes(ids.ravel()).items():
        if size < 2:
            continue
        mask = ids == gid
        mean = cells[mask].mean(axis=(0, 1, 2))
        cells[mask] = cells[mask] * (1 - fill) + mean * fill  # writes through the view into ``out``
    rgb = out.astype(np.uint8)
    pixel_ids = np.repeat(np.repeat(ids, ph, axis=0), pw, axis=1)
    rgb[_edges(pixel_ids)] = 255
    return _as_qimage(rgb)


def grid_groups(groups: Sequence[int], grid: tuple[int, int], cell: int = 12) -> QImage:
    """A ``grid`` of cells, one colour per merged group (single tokens dark grey), outlined between groups."""
    gh, gw = grid
    ids = np.asarray(groups, dtype=np.int64).reshape(gh, gw)
    colours = np.full((gh, gw, 3), 60, dtype=np.uint8)
    merged = [g for g, n in sorted(group_sizes(ids.ravel()).items()) if n > 1]
    for k, gid in enumerate(merged):
        colours[ids == gid] = _PALETTE[k % len(_PALETTE)]
    rgb = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    rgb[_edges(np.repeat(np.repeat(ids, cell, axis=0), cell, axis=1))] = 20
    return _as_qimage(rgb)


def text_groups_html(tokens: Sequence[str], groups: Sequence[int], *, dark: bool = True) -> str:
    """The tokens as HTML; tokens that merged share a background colour per group."""
    sizes = group_sizes(groups)
    merged = [g for g, s in sorted(sizes.items()) if s > 1]
    colour_of = {gid: _PALETTE[k % len(_PALETTE)] for k, gid in enumerate(merged)}
    parts = []
    for token, gid in zip(tokens, groups):
        text = html.escape(token)
        colour = colour_of.get(int(gid))
        if colour is None:
            parts.append(f'<span style="padding:1px 2px">{text}</span>')
        else:
            r, g, b = (int(x) for x in colour)
            fg = "#000000" if (0.299 * r + 0.587 * g + 0.114 * b) > 140 else "#ffffff"
            parts.append(
                f'<span style="background-color:rgb({r},{g},{b}); color:{fg}; padding:1px 2px" '
                f'title="group {int(gid)} ({sizes[int(gid)]} tokens)">{text}</span>'
            )
    return " ".join(parts)


def distinct_groups(groups: Optional[Sequence[int]]) -> int:
    return 0 if groups is None else len(group_sizes(groups))
