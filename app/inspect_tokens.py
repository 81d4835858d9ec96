"""The Tokens sub-tab of Inspect: token counts per tokenizer and the token premium over the parallel texts."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app.inspect_common import DEFAULT_TEXT, OVER_LIMIT, PIECE_COLOURS, one_line, InspectTab
from app.workers import GeneratorWorker

if TYPE_CHECKING:  # pragma: no cover
    from app.inspect_panel import InspectPanel


def pieces_html(count: Any, colours: Sequence[str] = PIECE_COLOURS, over: str = OVER_LIMIT) -> str:
    """One TokenCount's pieces as HTML: alternating backgrounds, special tokens in italics,
    pieces from ``overflow_token`` on (past the model's limit) in red."""
    parts = []
    cut = count.overflow_token
    for i, (piece, special) in enumerate(zip(count.pieces, count.special)):
        bg = over if cut is not None and i >= cut else colours[i % len(colours)]
        text = html.escape(piece).replace(" ", "&nbsp;")
        style = f"background-color:{bg}; color:#ffffff;"
        if special:
            text = f"<i>{text}</i>"
        title = f"token {i}: id {count.ids[i]}" + (" (past the limit)" if cut is not None and i >= cut else "")
        parts.append(f'<span style="{style}" title="{html.escape(title)}">{text}</span>')
    return "&#8203;".join(parts)  # zero-width spaces: the line may wrap between pieces



def _count(models: list[str], text: str):
    from core.inspect.tokenizers import compare_tokenizers
    from core.jobs import Progress

    out = []
    for i, model in enumerate(models):
        yield Progress(i, len(models), message=f"counting with {Path(model).name}")
        out.extend(compare_tokenizers([model], text))  # a failing model becomes a row with `error`
    yield Progress(len(models), len(models), message="done")
    return out


def _premium(models: list[str]):
    from core.inspect.tokenizers import token_premium
    from core.jobs import Progress

    merged: dict = {}
    for i, model in enumerate(models):  # one model at a time, so Stop takes effect between models
        yield Progress(i, len(models), message=f"parallel texts with {Path(model).name}")
        part = token_premium([model])
        if not merged:
            merged = part
        else:
            merged["models"].extend(part["models"])
    yield Progress(len(models), len(models), message="done")
    return merged



class CheckList(QListWidget):
    """A list of library models with check boxes."""

    def fill(self, infos: Sequence[Any]) -> None:
        checked = set(self.checked())
        self.clear()
        for info in infos:
            item = QListWidgetItem(info.name)
            item.setData(Qt.ItemDataRole.UserRole, str(info.path))
            item.setToolTip(f"{info.architecture}\n{info.path}")
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if str(info.path) in checked else Qt.CheckState.Unchecked)
            self.addItem(item)

    def checked(self) -> list[str]:
        return [self.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.count())
                if self.item(i).checkState() == Qt.CheckState.Checked]

    def set_checked(self, paths: Sequence[str]) -> None:
        wanted = {str(p) for p in paths}
        for i in range(self.count()):
            item = self.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.data(Qt.ItemDataRole.UserRole) in wanted
                               else Qt.CheckState.Unchecked)


class TokensTab(InspectTab):
    """Token counts of the checked models' tokenizers, and the token premium over languages."""

    kinds = ("tokens",)
    COLUMNS = ("Model", "Tokenizer", "Tokens", "Chars/token", "Limit")

    def __init__(self, panel: "InspectPanel") -> None:
        super().__init__(panel)
        from app.plots import BarChartView

        self.counts: list[Any] = []  # TokenCounts shown
        self.premium: Optional[dict] = None
        self.model_list = CheckList()
        self.model_list.setToolTip("Models whose tokenizers to compare")
        self.text_edit = QPlainTextEdit(DEFAULT_TEXT)
        self.text_edit.setPlaceholderText("Text to tokenize")
        self.text_edit.setMaximumHeight(110)
        self.count_button = QPushButton("Count")
        self.count_button.clicked.connect(self.count)
        self.parallel_button = QPushButton("Parallel text")
        self.parallel_button.setToolTip("Count UDHR Article 1 in many languages: the token premium relative to English "
                                        "(Petrov et al. 2023)")
        self.parallel_button.clicked.connect(self.count_parallel)
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.pieces = QTextBrowser()
        self.pieces.setToolTip("Each model's tokens; red: past the model's limit (cut off)")
        self.premium_table = QTableWidget(0, 0)
        self.premium_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.premium_model = QComboBox()
        self.premium_model.currentIndexChanged.connect(self.show_premium_chart)
        self.premium_note = QLabel("")
        self.premium_note.setObjectName("muted")
        self.premium_note.setWordWrap(True)
        self.chart = BarChartView()
        self.chart.problem.connect(self.fail)

        left = QWidget()
        l_layout = QVBoxLayout(left)
        l_layout.addWidget(QLabel("Models"))
        l_layout.addWidget(self.model_list, 1)
        l_layout.addWidget(QLabel("Text"))
        l_layout.addWidget(self.text_edit)
        buttons = QHBoxLayout()
        buttons.addWidget(self.count_button)
        buttons.addWidget(self.parallel_button)
        buttons.addWidget(self.stop_button)
        l_layout.addLayout(buttons)
        for widget in self.status_widgets():
            l_layout.addWidget(widget)

        self.result_tabs = QTabWidget()
        counts_page = QSplitter(Qt.Orientation.Vertical)
        counts_page.addWidget(self.table)
        counts_page.addWidget(self.pieces)
        self.result_tabs.addTab(counts_page, "Counts")
        premium_page = QWidget()
        p_layout = QVBoxLayout(premium_page)
        p_layout.addWidget(self.premium_table, 1)
        row = QHBoxLayout()
        row.addWidget(QLabel("Chart of"))
        row.addWidget(self.premium_model, 1)
        p_layout.addLayout(row)
        p_layout.addWidget(self.chart, 1)
        p_layout.addWidget(self.premium_note)
        self.result_tabs.addTab(premium_page, "Token premium")
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(self.result_tabs)
        splitter.setStretchFactor(1, 3)
        splitter.setSizes([320, 820])
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)
        self.fill_models()

    def fill_models(self) -> None:
        self.model_list.fill([m for m in self.panel.models() if getattr(m, "kind", "") != "single_file"])

    def set_running(self, running: bool) -> None:
        self.count_button.setEnabled(not running)
        self.parallel_button.setEnabled(not running)

    def _checked_or_fail(self) -> Optional[list[str]]:
        models = self.model_list.checked()
        if not models:
            self.fail("Check at least one model whose tokenizer to use.")
            return None
        return models

    def count(self) -> Optional[GeneratorWorker]:
        models = self._checked_or_fail()
        if models is None or not self.idle():
            return None
        text = self.text_edit.toPlainText()
        if not text.strip():
            self.fail("The text is empty; type something to tokenize.")
            return None
        sid = self.session_id()
        self.status_label.setText(f"Counting with {len(models)} tokenizer(s)…")
        return self.start(_count, models, text, on_result=lambda counts: self._counted(counts, models, text, sid))

    def _counted(self, counts: list, models: list[str], text: str, sid: Optional[int]) -> None:
        self.show_counts(counts)
        summary = {"counts": [
            {"model": c.model, "component": c.component, "tokenizer": c.tokenizer, "count": c.count,
             "content_count": c.content_count, "chars_per_token": c.chars_per_token, "max_length": c.max_length,
             "limit_source": c.limit_source, "overflow_token": c.overflow_token, "overflow_char": c.overflow_char,
             "unknown": c.unknown, "error": c.error}
            for c in counts]}
        self.record(sid, "tokens", models, {"text": text, "what": "count"}, summary)
        self.results += 1
        failed = sum(1 for c in counts if c.error)
        self.status_label.setText(f"Counted with {len(counts) - failed} tokenizer(s)"
                                  + (f"; {failed} could not be used (see the table)." if failed else "."))
        if failed:
            first = next(c.error for c in counts if c.error)
            self.problem_label.setText(one_line(first))
            self.problem_label.show()
            self.problem.emit(one_line(first))
        self.done.emit("tokens")

    def show_counts(self, counts: list) -> None:
        self.counts = list(counts)
        self.table.setRowCount(len(counts))
        blocks = []
        for row, c in enumerate(counts):
            label = f"{Path(c.model).name}" + (f" [{c.component}]" if c.component else "")
            if c.error:
                cells = (label, "", "", "", "")
            else:
                limit = "unknown" if c.max_length is None else str(c.max_length)
                if c.overflow_token is not None:
                    limit += f" (cut at token {c.overflow_token}, character {c.overflow_char})"
                cells = (label, c.tokenizer, str(c.count), f"{c.chars_per_token:.2f}", limit)
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(c.error or c.model)
                self.table.setItem(row, col, item)
            if c.error:
                self.table.setSpan(row, 1, 1, len(self.COLUMNS) - 1)
                self.table.setItem(row, 1, QTableWidgetItem(one_line(c.error)))
                blocks.append(f"<p><b>{html.escape(label)}</b>: <span style='color:{OVER_LIMIT}'>"
                              f"{html.escape(one_line(c.error))}</span></p>")
            else:
                if self.table.columnSpan(row, 1) > 1:  # a row that held an error before
                    self.table.setSpan(row, 1, 1, 1)
                blocks.append(f"<p><b>{html.escape(label)}</b> — {html.escape(c.tokenizer)}, {c.count} tokens</p>"
                              f"<p style='line-height:150%'>{pieces_html(c)}</p>")
        self.pieces.setHtml("".join(blocks))
        self.result_tabs.setCurrentIndex(0)

    def count_parallel(self) -> Optional[GeneratorWorker]:
        models = self._checked_or_fail()
        if models is None or not self.idle():
            return None
        sid = self.session_id()
        self.status_label.setText("Counting the parallel texts…")
        return self.start(_premium, models, on_result=lambda premium: self._premium_done(premium, models, sid))

    def _premium_done(self, premium: dict, models: list[str], sid: Optional[int]) -> None:
        self.show_premium(premium)
        self.record(sid, "tokens", models, {"what": "token premium", "texts": "udhr-article1"}, premium)
        self.results += 1
        self.status_label.setText(f"Token premium over {len(premium['languages'])} languages.")
        self.done.emit("tokens")

    def premium_rows(self) -> list[dict]:
        return [] if self.premium is None else list(self.premium["models"])

    def show_premium(self, premium: dict) -> None:
        from core.inspect.tokenizers import parallel_texts

        self.premium = premium
        rows = self.premium_rows()
        languages = premium["languages"]
        try:
            names = {code: entry.get("language", code) for code, entry in parallel_texts().items()}
        except Exception:  # the table still shows the codes
            names = {}
        self.premium_table.clear()
        self.premium_table.setRowCount(len(languages))
        self.premium_table.setColumnCount(len(rows))
        self.premium_table.setHorizontalHeaderLabels(
            [Path(r["model"]).name + (f" [{r['component']}]" if r.get("component") else "") for r in rows])
        self.premium_table.setVerticalHeaderLabels([f"{names.get(c, c)} ({c})" for c in languages])
        for col, r in enumerate(rows):
            for row, code in enumerate(languages):
                if r.get("error"):
                    item = QTableWidgetItem("—")
                    item.setToolTip(one_line(r["error"]))
                else:
                    item = QTableWidgetItem(f"{r['premium'][code]:.2f}")
                    unknown = r.get("unknown", {}).get(code, 0)
                    item.setToolTip(f"{r['counts'][code]} tokens" + (f", {unknown} unknown" if unknown else ""))
                self.premium_table.setItem(row, col, item)
        self.premium_model.blockSignals(True)
        self.premium_model.clear()
        for i, r in enumerate(rows):
            if not r.get("error"):
                self.premium_model.addItem(self.premium_table.horizontalHeaderItem(i).text(), i)
        self.premium_model.blockSignals(False)
        self.result_tabs.setCurrentIndex(1)
        self.show_premium_chart()

    def show_premium_chart(self, *args: Any) -> None:
        index = self.premium_model.currentData()
        if self.premium is None or index is None:
            return
        row = self.premium_rows()[index]
        languages = self.premium["languages"]
        self.chart.set_data([row["premium"][c] for c in languages], languages,
                            title=f"Token premium vs English: {Path(row['model']).name}", y_label="× English",
                            reference=1.0)
        lossy = [c for c in languages if row.get("unknown", {}).get(c, 0)]
        self.premium_note.setText(
            f"{len(lossy)} language(s) contain unknown tokens for this tokenizer ({', '.join(lossy[:8])}"
            f"{'…' if len(lossy) > 8 else ''}): text it cannot represent, so their premium understates the cost."
            if lossy else "")

    def reload(self, row: int) -> None:
        if not 0 <= row < len(self.earlier):
            return
        record = self.earlier[row]
        if record.settings.get("what") == "token premium" and "models" in record.results:
            self.show_premium(record.results)
            self.status_label.setText("Showing an earlier token premium.")
        else:
            self.status_label.setText("Earlier counts keep their figures only; press Count to see the pieces again.")
            if "text" in record.settings:
                self.text_edit.setPlainText(record.settings["text"])
            self.model_list.set_checked(record.models)


