"""Draw the sample images of the Tokens panel (deterministic; numpy and Pillow only).

Run from anywhere: ``python resources/samples/make_samples.py`` rewrites the three
PNGs next to this file. Each picture has large flat regions and sharp edges, so the
groups that token merging forms visibly follow its regions:

* ``scene.png``: a sky, a sun, ground, a house, a tree and a pond;
* ``chart.png``: a checkerboard test chart with coloured circles and a target;
* ``shapes.png``: a colour gradient with a few bold shapes.

Made for Merge Studio and dedicated to the public domain (CC0); see LICENSE.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256
HERE = Path(__file__).resolve().parent


def _vertical(top: tuple, bottom: tuple, height: int, width: int) -> np.ndarray:
    """A ``[height, width, 3]`` float gradient from ``top`` to ``bottom``."""
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    return (1 - t) * np.array(top, float) + t * np.array(bottom, float) * np.ones((1, width, 1))


def scene() -> Image.Image:
    """Sky, sun, ground, a house, a tree and a pond."""
    horizon = int(SIZE * 0.58)
    pixels = np.zeros((SIZE, SIZE, 3))
    pixels[:horizon] = _vertical((70, 130, 210), (185, 215, 240), horizon, SIZE)
    pixels[horizon:] = _vertical((95, 165, 70), (50, 110, 40), SIZE - horizon, SIZE)
    image = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((186, 22, 232, 68), fill=(250, 215, 80))  # sun
    draw.polygon([(0, horizon), (60, 118), (130, horizon)], fill=(120, 140, 160))  # hill
    draw.rectangle((40, 120, 112, 176), fill=(190, 60, 50))  # house
    draw.polygon([(32, 122), (76, 84), (120, 122)], fill=(90, 50, 40))  # roof
    draw.rectangle((68, 146, 84, 176), fill=(70, 40, 30))  # door
    draw.rectangle((48, 132, 62, 144), fill=(240, 230, 150))  # window
    draw.rectangle((176, 126, 188, 184), fill=(110, 75, 40))  # trunk
    draw.ellipse((150, 80, 214, 140), fill=(40, 120, 45))  # crown
    draw.ellipse((100, 200, 200, 236), fill=(60, 120, 200))  # pond
    return image


def chart() -> Image.Image:
    """A checkerboard with coloured circles and a black-and-white target in the middle."""
    cell = 32
    rows, cols = np.indices((SIZE, SIZE)) // cell
    grey = np.where((rows + cols) % 2 == 0, 215, 90).astype(np.uint8)
    image = Image.fromarray(np.stack([grey] * 3, axis=-1))
    draw = ImageDraw.Draw(image)
    for (x, y, r), colour in zip(
        ((52, 52, 34), (204, 52, 26), (52, 204, 22), (204, 204, 38)),
        ((220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 200, 30)),
    ):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    for radius, colour in ((56, (0, 0, 0)), (42, (255, 255, 255)), (28, (0, 0, 0)), (14, (255, 255, 255))):
        draw.ellipse((128 - radius, 128 - radius, 128 + radius, 128 + radius), fill=colour)
    return image


def shapes() -> Image.Image:
    """A diagonal orange-to-violet gradient with a triangle, a square, a ring and a bar."""
    y, x = np.indices((SIZE, SIZE)) / (SIZE - 1)
    t = ((x + y) / 2)[..., None]
    pixels = (1 - t) * np.array((250, 160, 60), float) + t * np.array((90, 60, 170), float)
    image = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.polygon([(40, 110), (90, 24), (140, 110)], fill=(255, 255, 255))  # triangle
    draw.rectangle((160, 30, 226, 96), fill=(20, 20, 30))  # square
    draw.ellipse((40, 140, 130, 230), fill=(0, 200, 200))  # ring
    draw.ellipse((62, 162, 108, 208), fill=tuple(int(v) for v in pixels[185, 85].round()))
    draw.rectangle((150, 150, 236, 176), fill=(230, 40, 120))  # bar
    draw.rectangle((150, 196, 236, 222), fill=(250, 230, 60))  # bar
    return image


def main() -> None:
    for name, make in (("scene", scene), ("chart", chart), ("shapes", shapes)):
        path = HERE / f"{name}.png"
        make().save(path, optimize=True)
        print(f"{path} ({path.stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
