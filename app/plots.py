"""Plots for the Inspect panel: a labelled heat map, an image with a heat overlay, a bar chart.

All three are pyqtgraph views (in the style of pyqtgraph's examples: an ``ImageItem``
with a ``ColorBarItem``, a ``BarGraphItem``) with an "Export…" button; every one
writes PNG (``pyqtgraph.exporters.ImageExporter``) or SVG (``SVGExporter``), chosen
by the file's suffix. pyqtgraph is imported by this module, so the window imports
it only when the Inspect panel builds its views.

Coordinates: a heat map's cell ``(row, col)`` covers ``x in [col, col + 1)`` and
``y in [row, row + 1)``, with the y axis inverted so row 0 is at the top (the way
an attention matrix ``[queries, keys]`` is printed).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QFileDialog,
    QGraphicsRectItem,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from core.errors import MergeStudioError

EXPORT_SUFFIXES = (".png", ".svg")
MAX_TICKS = 40  # tick labels per axis before they are thinned to every k-th
EXPORT_FILTER = "PNG image (*.png);;SVG drawing (*.svg)"
NAN_GREY = (128, 128, 128, 255)


class ExportError(MergeStudioError):
    """A plot cannot be written where or how it was asked."""


def thinned_ticks(labels: Sequence[str], max_ticks: int = MAX_TICKS) -> list[tuple[float, str]]:
    """(position, label) at cell centres, every k-th label when there are more than ``max_ticks``.

    ``k = ceil(len(labels) / max_ticks)``: with 100 tokens and 40 ticks every 3rd is shown,
    so labels never overlap into an unreadable smear; the rest stay in the tooltip.
    """
    n = len(labels)
    step = max(1, math.ceil(n / max_ticks)) if max_ticks > 0 else 1
    return [(i + 0.5, str(labels[i])) for i in range(0, n, step)]


def _colormap(name: str = "viridis") -> Any:
    return pg.colormap.get(name)


class _PlotView(QWidget):
    """A pyqtgraph PlotWidget with an "Export…" button; subclasses add the items."""

    problem = Signal(str)  # one sentence (a failed export)
    exported = Signal(str)  # the path written

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        from app.theme import plot_colors

        colors = plot_colors()
        self.plot = pg.PlotWidget()
        self.plot.setBackground(colors["background"])
        self.plot.setMinimumSize(200, 160)
        self.plot_item = self.plot.getPlotItem()
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("Save this plot as a PNG image or an SVG drawing")
        self.export_button.clicked.connect(self.choose_export)
        self.export_dialog: Optional[QFileDialog] = None
        self.last_export: Optional[Path] = None
        self.toolbar = QHBoxLayout()
        self.toolbar.setContentsMargins(0, 0, 0, 0)
        self.toolbar.addStretch(1)
        self.toolbar.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot, 1)
        layout.addLayout(self.toolbar)

    # -- export ------------------------------------------------------------------
    def choose_export(self) -> QFileDialog:
        """Ask for a file with a non-blocking (non-native) dialog; the chosen file is exported."""
        dialog = QFileDialog(self, "Export the plot", str(Path.home() / "plot.png"), EXPORT_FILTER)
        dialog.setAcceptMode(QFileDialog.AcceptMode.AcceptSave)
        dialog.setOption(QFileDialog.Option.DontUseNativeDialog, True)  # the same dialog everywhere, tests too
        dialog.setDefaultSuffix("png")
        dialog.fileSelected.connect(self._export_chosen)
        self.export_dialog = dialog
        dialog.open()
        return dialog

    def _export_chosen(self, path: str) -> None:
        try:
            self.export(path)
        except MergeStudioError as exc:
            self.problem.emit(str(exc))

    def export(self, path: str | os.PathLike) -> Path:
        """Write the plot to ``path``: ``.png`` (image) or ``.svg`` (drawing); ExportError otherwise.

        Written under a temporary name in the same folder and renamed, so a failed
        export never leaves half a file where a good one was.
        """
        from pyqtgraph.exporters import ImageExporter, SVGExporter

        path = Path(path).expanduser()
        suffix = path.suffix.lower()
        if suffix not in EXPORT_SUFFIXES:
            raise ExportError(
                f"Cannot export to {path}: the file name must end in .png (image) or .svg (drawing), "
                f"not {path.suffix or 'nothing'}."
            )
        if not path.parent.is_dir():
            raise ExportError(f"Cannot export to {path}: the folder {path.parent} does not exist.")
        scene = self.plot.scene()
        if self.plot.width() < 2 or self.plot.height() < 2 or not self.plot.isVisible():
            raise ExportError(f"Cannot export to {path}: the plot has not been shown yet, so it has no size.")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=str(path.parent))
        os.close(fd)
        try:
            if suffix == ".png":
                ImageExporter(scene).export(tmp)  # the plot as shown, at its on-screen size
            else:
                try:
                    SVGExporter(scene).export(tmp)
                except ValueError:
                    # pyqtgraph 0.14's SVGExporter cannot parse the path data newer Qt writes
                    # (pyqtgraph issue #3485); Qt's own SVG generator draws the same scene.
                    _render_svg(scene, tmp, self.plot_item.titleLabel.text or "Merge Studio plot")
            if not Path(tmp).is_file() or Path(tmp).stat().st_size == 0:
                raise ExportError(f"Cannot export to {path}: nothing was written.")
            os.replace(tmp, path)
        except OSError as exc:
            raise ExportError(f"Cannot export to {path}: {exc.strerror or exc}.") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.last_export = path
        self.exported.emit(str(path))
        return path


def _render_svg(scene: Any, path: str, title: str) -> None:
    """Draw a plot's scene, as its view shows it, into an SVG file with Qt's QSvgGenerator
    (vector paths; images embedded as PNG)."""
    from PySide6.QtCore import QRectF, QSize
    from PySide6.QtGui import QPainter
    from PySide6.QtSvg import QSvgGenerator

    view = scene.getViewWidget()
    target = QRectF(view.rect())
    source = view.viewportTransform().inverted()[0].mapRect(target)  # what the view shows, in scene units
    generator = QSvgGenerator()
    generator.setFileName(path)
    generator.setSize(QSize(int(target.width()), int(target.height())))
    generator.setViewBox(target)
    generator.setTitle(title)
    painter = QPainter(generator)
    try:
        scene.render(painter, target, source)
    finally:
        painter.end()


class HeatmapView(_PlotView):
    """A matrix ``[rows, cols]`` as a colour image with a colour bar and optional tick labels.

    NaN cells are transparent over a grey backdrop; clicking a cell emits ``cellClicked(row, col)``.
    """

    cellClicked = Signal(int, int)

    def __init__(self, parent: Optional[QWidget] = None, colormap: str = "viridis") -> None:
        super().__init__(parent)
        self.data: Optional[np.ndarray] = None  # what set_data was given, [rows, cols] float
        self.row_labels: list[str] = []
        self.col_labels: list[str] = []
        self.title = ""
        self.levels: tuple[float, float] = (0.0, 1.0)
        self.backdrop = QGraphicsRectItem(0, 0, 1, 1)
        self.backdrop.setBrush(QColor(*NAN_GREY))
        self.backdrop.setPen(pg.mkPen(None))
        self.backdrop.setZValue(-10)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot_item.addItem(self.backdrop)
        self.plot_item.addItem(self.image)
        self.plot_item.invertY(True)
        self.plot_item.setAspectLocked(False)
        self.plot_item.hideButtons()
        self.colorbar = pg.ColorBarItem(values=(0.0, 1.0), colorMap=_colormap(colormap), interactive=False)
        self.colorbar.setImageItem(self.image, insert_in=self.plot_item)
        self.hover_label = QLabel()
        self.hover_label.setObjectName("muted")
        self.toolbar.insertWidget(0, self.hover_label)
        self._ticks: dict[str, list[tuple[float, str]]] = {"left": [], "bottom": []}
        self.plot_item.vb.sigResized.connect(self._apply_ticks)
        self.plot_item.getAxis("bottom").setStyle(hideOverlappingLabels=False)  # the first label may hang left
        self.plot.scene().sigMouseClicked.connect(self._clicked)
        self.plot.scene().sigMouseMoved.connect(self._moved)

    def set_data(
        self,
        array: Any,
        row_labels: Optional[Sequence[str]] = None,
        col_labels: Optional[Sequence[str]] = None,
        title: str = "",
        levels: Optional[tuple[float, float]] = None,
    ) -> None:
        """Show ``array [rows, cols]``; labels (one per row / column) become thinned tick labels.

        ``levels`` fixes the colour range (min, max); by default the finite min and max of
        the data (a constant matrix gets ``(v - 0.5, v + 0.5)`` so it still has a colour).
        """
        data = np.asarray(array, dtype=np.float64)
        if data.ndim != 2:
            raise ValueError(f"a heat map takes a 2-D array [rows, cols], not shape {data.shape}")
        rows, cols = data.shape
        self.data = data
        self.row_labels = [str(x) for x in row_labels] if row_labels is not None else []
        self.col_labels = [str(x) for x in col_labels] if col_labels is not None else []
        self.title = title
        finite = data[np.isfinite(data)]
        if levels is None:
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        else:
            lo, hi = float(levels[0]), float(levels[1])
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        self.levels = (lo, hi)
        # NaN/inf cells: transparent (alpha 0 in pyqtgraph's float path), so the grey backdrop shows.
        shown = np.where(np.isfinite(data), data, np.nan).astype(np.float32)
        self.image.setImage(shown, autoLevels=False)
        self.image.setRect(0, 0, cols, rows)
        self.colorbar.setLevels((lo, hi))
        self.backdrop.setRect(0, 0, cols, rows)
        self.plot_item.setTitle(title)
        self.plot_item.setRange(xRange=(0, cols), yRange=(0, rows), padding=0.02)
        self._apply_ticks()
        self.hover_label.setText("")

    def _apply_ticks(self, *args: Any) -> None:
        """Tick labels thinned to what fits: rows ~14 px apart; columns every k-th, with the smallest
        k at which neighbouring labels (measured in the axis font) do not overlap."""
        from PySide6.QtGui import QFontMetricsF

        rect = self.plot_item.vb.boundingRect()
        height, width = max(rect.height(), 1.0), max(rect.width(), 1.0)
        rows_fit = max(1, min(MAX_TICKS, int(height // 14)))
        self._ticks["left"] = thinned_ticks(self.row_labels, rows_fit) if self.row_labels else []
        self._ticks["bottom"] = []
        if self.col_labels:
            metrics = QFontMetricsF(self.font())
            widths = [metrics.horizontalAdvance(label) + 8 for label in self.col_labels]
            cell = width / len(self.col_labels)
            step = 1
            while step < len(widths) and any(
                step * cell < (widths[i] + widths[i + step]) / 2 for i in range(0, len(widths) - step, step)
            ):
                step += 1
            step = max(step, math.ceil(len(widths) / MAX_TICKS))
            self._ticks["bottom"] = [(i + 0.5, self.col_labels[i]) for i in range(0, len(widths), step)]
        for axis in ("left", "bottom"):
            labels = self.row_labels if axis == "left" else self.col_labels
            self.plot_item.getAxis(axis).setTicks([self._ticks[axis]] if labels else None)

    def image_data(self) -> Optional[np.ndarray]:
        """The array the image item holds now ([rows, cols])."""
        return None if self.image.image is None else np.asarray(self.image.image)

    def ticks(self, axis: str = "left") -> list[tuple[float, str]]:
        """The tick labels shown now on ``axis`` ("left": rows, "bottom": columns)."""
        return list(self._ticks.get(axis, []))

    def cell_at(self, scene_pos: QPointF) -> Optional[tuple[int, int]]:
        """The (row, col) under a scene position, or None outside the matrix."""
        if self.data is None or not self.plot_item.vb.sceneBoundingRect().contains(scene_pos):
            return None
        point = self.plot_item.vb.mapSceneToView(scene_pos)
        col, row = math.floor(point.x()), math.floor(point.y())
        rows, cols = self.data.shape
        if 0 <= row < rows and 0 <= col < cols:
            return row, col
        return None

    def scene_pos_of(self, row: int, col: int) -> QPointF:
        """The scene position of a cell's centre (for tests and keyboard navigation)."""
        return self.plot_item.vb.mapViewToScene(QPointF(col + 0.5, row + 0.5))

    def _clicked(self, event: Any) -> None:
        if event.button() != Qt.MouseButton.LeftButton:
            return
        cell = self.cell_at(event.scenePos())
        if cell is not None:
            self.cellClicked.emit(*cell)

    def _moved(self, scene_pos: QPointF) -> None:
        cell = self.cell_at(scene_pos)
        if cell is None or self.data is None:
            self.hover_label.setText("")
            return
        row, col = cell
        r = self.row_labels[row] if row < len(self.row_labels) else str(row)
        c = self.col_labels[col] if col < len(self.col_labels) else str(col)
        value = self.data[row, col]
        self.hover_label.setText(f"{r} → {c}: {value:.4g}" if np.isfinite(value) else f"{r} → {c}: none")


def _resample_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """``array [h, w, ...]`` to ``[height, width, ...]`` by nearest cell (patch grids onto pixels)."""
    h, w = array.shape[:2]
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    return array[rows][:, cols]


def group_boundaries(groups: np.ndarray, height: int, width: int) -> np.ndarray:
    """True on pixels of an ``[height, width]`` image where the group id (``groups [gh, gw]``) changes
    from the left or upper neighbour: the outlines of merged-token groups."""
    ids = _resample_nearest(np.asarray(groups), height, width)
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    return edge


class ImageOverlayView(_PlotView):
    """An RGB image ``[H, W, 3]`` with a heat map ``[h, w]`` stretched over it (alpha slider) and
    optional group outlines from an integer label map ``[gh, gw]``."""

    def __init__(self, parent: Optional[QWidget] = None, colormap: str = "inferno") -> None:
        super().__init__(parent)
        self.rgb: Optional[np.ndarray] = None
        self.heat: Optional[np.ndarray] = None
        self.groups: Optional[np.ndarray] = None
        self.title = ""
        self.base = pg.ImageItem(axisOrder="row-major")
        self.overlay = pg.ImageItem(axisOrder="row-major")
        self.outline = pg.ImageItem(axisOrder="row-major")
        self.overlay.setZValue(1)
        self.outline.setZValue(2)
        for item in (self.base, self.overlay, self.outline):
            self.plot_item.addItem(item)
        self.plot_item.invertY(True)
        self.plot_item.setAspectLocked(True)
        self.plot_item.hideButtons()
        self.plot_item.hideAxis("left")
        self.plot_item.hideAxis("bottom")
        self.colorbar = pg.ColorBarItem(values=(0.0, 1.0), colorMap=_colormap(colormap), interactive=False)
        self.colorbar.setImageItem(self.overlay, insert_in=self.plot_item)
        self.alpha_slider = QSlider(Qt.Orientation.Horizontal)
        self.alpha_slider.setRange(0, 100)
        self.alpha_slider.setValue(55)
        self.alpha_slider.setMaximumWidth(160)
        self.alpha_slider.setToolTip("How strongly the heat map covers the image")
        self.alpha_slider.valueChanged.connect(self._alpha_changed)
        self.toolbar.insertWidget(0, QLabel("Overlay"))
        self.toolbar.insertWidget(1, self.alpha_slider)
        self._alpha_changed(self.alpha_slider.value())

    @property
    def alpha(self) -> float:
        return self.alpha_slider.value() / 100.0

    def _alpha_changed(self, value: int) -> None:
        self.overlay.setOpacity(value / 100.0)

    def set_data(
        self,
        image: Any,
        heat: Any = None,
        groups: Any = None,
        title: str = "",
        levels: Optional[tuple[float, float]] = None,
    ) -> None:
        """Show ``image [H, W, 3]`` uint8, ``heat [h, w]`` over it (None: no overlay) and the
        outlines of ``groups [gh, gw]`` (None: none). ``levels`` as in :meth:`HeatmapView.set_data`."""
        rgb = np.asarray(image)
        if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
            raise ValueError(f"an overlay view takes an image [H, W, 3], not shape {rgb.shape}")
        rgb = rgb[..., :3].astype(np.uint8)
        height, width = rgb.shape[:2]
        self.rgb, self.title = rgb, title
        self.base.setImage(rgb, autoLevels=False, levels=(0, 255))
        self.base.setRect(0, 0, width, height)
        if heat is None:
            self.heat = None
            self.overlay.clear()
        else:
            values = np.asarray(heat, dtype=np.float64)
            if values.ndim != 2:
                raise ValueError(f"a heat overlay takes a 2-D array [h, w], not shape {values.shape}")
            self.heat = values
            finite = values[np.isfinite(values)]
            lo, hi = levels if levels is not None else (
                (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
            if not hi > lo:
                lo, hi = lo - 0.5, hi + 0.5
            self.overlay.setImage(values.astype(np.float32), autoLevels=False)
            self.overlay.setRect(0, 0, width, height)  # a patch grid stretched over the whole picture
            self.colorbar.setLevels((float(lo), float(hi)))
        if groups is None:
            self.groups = None
            self.outline.clear()
        else:
            self.groups = np.asarray(groups)
            edge = group_boundaries(self.groups, height, width)
            rgba = np.zeros((height, width, 4), dtype=np.uint8)
            rgba[edge] = (255, 255, 255, 230)
            self.outline.setImage(rgba, autoLevels=False, levels=(0, 255))
            self.outline.setRect(0, 0, width, height)
        self.plot_item.setTitle(title)
        self.plot_item.setRange(xRange=(0, width), yRange=(0, height), padding=0.01)

    def overlay_data(self) -> Optional[np.ndarray]:
        return None if self.overlay.image is None else np.asarray(self.overlay.image)


class BarChartView(_PlotView):
    """Bars (``BarGraphItem``) with category labels on the x axis and an optional reference line."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        from app.theme import plot_colors

        self._color = plot_colors()["curves"][0]
        self.values: list[float] = []
        self.labels: list[str] = []
        self.title = ""
        self.bars: Optional[pg.BarGraphItem] = None
        self.reference: Optional[pg.InfiniteLine] = None
        self.plot_item.showGrid(y=True, alpha=0.2)
        self.plot_item.setMouseEnabled(x=False, y=False)
        self.plot_item.hideButtons()

    def set_data(
        self,
        values: Sequence[float],
        labels: Sequence[str],
        title: str = "",
        y_label: str = "",
        reference: Optional[float] = None,
    ) -> None:
        """One bar per value, labelled below; ``reference`` draws a horizontal line (e.g. 1.0)."""
        heights = [float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in values]
        self.values, self.labels, self.title = heights, [str(x) for x in labels], title
        if self.bars is not None:
            self.plot_item.removeItem(self.bars)
        if self.reference is not None:
            self.plot_item.removeItem(self.reference)
            self.reference = None
        self.bars = pg.BarGraphItem(x=np.arange(len(heights)), height=heights, width=0.7, brush=self._color)
        self.plot_item.addItem(self.bars)
        if reference is not None:
            pen = pg.mkPen("#888888", style=Qt.PenStyle.DashLine)
            self.reference = pg.InfiniteLine(pos=float(reference), angle=0, pen=pen)
            self.plot_item.addItem(self.reference)
        ticks = [(i, label) for i, label in enumerate(self.labels)]
        step = max(1, math.ceil(len(ticks) / MAX_TICKS))
        self.plot_item.getAxis("bottom").setTicks([ticks[::step]])
        self.plot_item.setLabel("left", y_label)
        self.plot_item.setTitle(title)
        top = max(heights + [reference or 0.0, 1e-9])
        self.plot_item.setRange(xRange=(-0.6, max(len(heights), 1) - 0.4), yRange=(0, top * 1.08), padding=0)

    def bar_heights(self) -> list[float]:
        if self.bars is None:
            return []
        return [float(h) for h in self.bars.opts["height"]]
