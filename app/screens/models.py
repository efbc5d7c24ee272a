"""Models: the curated catalogue and what is already downloaded, each with its verdict
for the current budget; download with progress, cancel and resume; open in the chat.

Everything that touches the network or the disk runs on a worker; the download layer
(``mlx_pager.download`` / ``mlx_pager.hub``) is reached through ``app.downloads``.
"""

from __future__ import annotations

import threading

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    Button,
    DataTable,
    Header,
    Input,
    Label,
    ProgressBar,
    Static,
)

from .. import downloads
from ..messages import DownloadFinished, DownloadProgress
from ..text import size
from ..widgets.footer import Footer

VERDICT_WORD = {"fits": "fits fully", "paged": "runs paged", "too_large": "too large"}


def fit_columns(table: DataTable, rows: list[tuple]) -> None:
    """Widen the columns to these cells before they go in.

    A DataTable measures auto-width columns only when idle, and lines it rendered before
    that stay cached at the old widths (Textual 8.2): the list could show its columns cut
    to their titles. Widths set first, then cells added, are right in the first frame.
    """
    for i, column in enumerate(table.ordered_columns):
        cells = [Text(row[i]) if isinstance(row[i], str) else row[i] for row in rows]
        column.auto_width = False
        column.width = max(column.width, column.label.cell_len, *(c.cell_len for c in cells))


class ConfirmDownload(ModalScreen[bool]):
    """Asks before a download starts: what it costs and the verdict for the budget.
    Returns True to download."""

    BINDINGS = [
        Binding("escape,n", "dismiss(False)", "Not now"),
        Binding("y", "dismiss(True)", "Download"),
    ]

    def __init__(self, row: downloads.ModelRow, estimate: downloads.Estimate | None) -> None:
        super().__init__()
        self.row = row
        self.estimate = estimate

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog"):
            yield Label(f"Download {self.row.label}?", classes="dialog-title")
            yield Static(self._summary(), id="confirm-text")
            with Horizontal(id="confirm-buttons"):
                yield Button("Download (y)", id="confirm-yes", variant="primary")
                yield Button("Not now (n)", id="confirm-no")

    def on_mount(self) -> None:
        too_large = self.estimate is not None and self.estimate.verdict == "too_large"
        self.query_one("#confirm-no" if too_large else "#confirm-yes", Button).focus()

    def _summary(self) -> Text:
        """What downloading costs and the verdict, as the detail panel and the CLI say it."""
        estimate = self.estimate
        text = Text()
        verdict = estimate.verdict if estimate is not None else ""
        for label, value in downloads.describe_download(estimate) if estimate else []:
            if label in ("your budget", "speed"):
                continue  # said below, with its colour
            style = "red" if label == "problem" else ""
            text.append(f"{label}: ", style="dim")
            text.append(f"{value}\n", style=style)
        if verdict:
            style = downloads.VERDICT_STYLE.get(verdict, "")
            text.append(f"Your budget: {VERDICT_WORD.get(verdict, verdict)}. ", style=style)
            text.append(estimate.explain if estimate is not None else "")
            if verdict == "too_large":
                text.append("\nIt will not run at this budget: raise the budget in Settings "
                            "(F3) or pick a smaller model.", style="bold")  # fmt: skip
        else:
            text.append("Your budget: unknown until the Hub answers (its sizes are not known).",
                        style="dim")  # fmt: skip
        return text

    @on(Button.Pressed, "#confirm-yes")
    def _yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#confirm-no")
    def _no(self) -> None:
        self.dismiss(False)


class ModelsScreen(Screen):
    """Installed once by the app, so a download goes on while the user chats."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+d", "download", "Download"),
        Binding("ctrl+x", "cancel", "Cancel download"),
        Binding("ctrl+o", "open", "Open in chat"),
        Binding("ctrl+r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, downloads.ModelRow] = {}
        self.selected: str | None = None
        self.estimates: dict[str, downloads.Estimate] = {}
        self.downloading: str | None = None
        self.loaded = False  # the first listing arrived
        # A worker's result that carries an older number than these is stale and dropped:
        # a slow listing must not overwrite a newer one, nor a Hub answer asked for before
        # the estimates were reset (made for the previous budget) come back as current.
        self._listing = 0
        self._epoch = 0
        self._cancel = threading.Event()
        self._asking = False  # the ConfirmDownload question is up
        self._pending: tuple[str, bool] | None = None  # (repo, ask): download once planned

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="models-body"):
            with Vertical(id="models-left"):
                yield Label("Models  (✓ downloaded)", classes="panel-title")
                yield DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
                with Horizontal(id="hub-row"):
                    yield Input(
                        placeholder="a Hub id (org/model-4bit) or a model folder", id="repo-id"
                    )
                    yield Button("Check", id="check")
            with VerticalScroll(id="models-right"):
                yield Static(id="model-detail")
                yield ProgressBar(id="download-bar", show_eta=False)
                yield Label("", id="download-status")
                with Horizontal(id="model-actions"):
                    yield Button("Download", id="download", variant="primary")
                    yield Button("Cancel", id="cancel", variant="error")
                    yield Button("Open", id="open", variant="success")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "models"
        table = self.query_one(DataTable)
        table.add_columns("", "Model", "Size", "Your budget")

    def on_screen_resume(self) -> None:
        """Every visit, the first too (Textual resumes a screen as it is pushed): list."""
        if self._asking:  # back from the download question: nothing changed meanwhile
            self._asking = False
            return
        self.estimates.clear()  # the budget may have changed in the settings
        self._epoch += 1
        self._pending = None
        self.action_refresh()

    # -- the list ---------------------------------------------------------------------

    def action_refresh(self) -> None:
        self._listing += 1
        self._load_rows(self._listing)

    @work(thread=True, exclusive=True, group="rows", exit_on_error=False)
    def _load_rows(self, listing: int) -> None:
        """Rows and their quick verdicts (catalogue sizes, cached headers): no network."""
        config, settings = self.app.config, self.app.settings
        try:
            rows = downloads.list_models(config)
            total = config.machine().total_bytes
            machine = config.speed(measure=False)  # the cached constants: no wait
            quick = {r.repo_id: downloads.quick_estimate(r, settings, total, machine)
                     for r in rows}  # fmt: skip
        except Exception as e:
            self.app.call_from_thread(self._rows_failed, str(e) or type(e).__name__)
            return
        self.app.call_from_thread(self._show_rows, rows, quick, listing)
        if machine is not None:
            return
        try:  # none cached: the rows say "estimate pending" while this machine is measured
            machine = config.speed()
            if machine is None:
                return
            quick = {r.repo_id: downloads.quick_estimate(r, settings, total, machine)
                     for r in rows}  # fmt: skip
        except Exception as e:
            self.app.call_from_thread(self._rows_failed, str(e) or type(e).__name__)
            return
        self.app.call_from_thread(self._show_rows, list(rows), quick, listing)

    def _rows_failed(self, error: str) -> None:
        self.notify(error, title="Could not list models", severity="error", timeout=10)

    def _show_rows(
        self,
        rows: list[downloads.ModelRow],
        quick: dict[str, downloads.Estimate],
        listing: int,
    ) -> None:
        if listing != self._listing:
            return  # a newer listing is on its way
        for row in self.rows.values():  # keep ids the user typed in
            if row.custom and row.repo_id not in {r.repo_id for r in rows}:
                rows.append(row)
        self.rows = {r.repo_id: r for r in rows}
        self.loaded = True
        for repo_id, estimate in quick.items():
            if not self.estimates.get(repo_id, downloads.Estimate()).planned:
                self.estimates[repo_id] = estimate
        table = self.query_one(DataTable)
        table.clear()
        cells = [self._cells(row) for row in rows]
        fit_columns(table, cells)
        for row, row_cells in zip(rows, cells, strict=True):
            table.add_row(*row_cells, key=row.repo_id)
        if self.selected in self.rows:
            table.move_cursor(row=table.get_row_index(self.selected))
            self._select(self.selected)  # asks the Hub again if its answer was reset
        elif rows:
            self._select(rows[0].repo_id)
        self._update_detail()

    def _cells(self, row: downloads.ModelRow) -> tuple:
        estimate = self.estimates.get(row.repo_id)
        verdict = Text("…", style="dim")
        if estimate is not None and estimate.verdict:
            verdict = Text(VERDICT_WORD.get(estimate.verdict, estimate.verdict),
                           style=downloads.VERDICT_STYLE.get(estimate.verdict, ""))  # fmt: skip
            if estimate.speed_basis and estimate.verdict == "paged":
                verdict.append(f" {downloads.estimate_speed_text(estimate)}", style="dim")
        elif estimate is not None and estimate.error:
            verdict = Text("unknown", style="red")
        elif estimate is not None and (estimate.planned or row.cached):
            verdict = Text("unknown", style="dim")
        mark = "✓" if row.cached else ("◐" if row.partial else "")
        size_text = size(row.size_bytes) if row.size_bytes else ""
        return (mark, row.label, size_text, verdict)

    def _refresh_row(self, repo_id: str) -> None:
        table = self.query_one(DataTable)
        if repo_id not in self.rows:
            return
        cells = self._cells(self.rows[repo_id])
        fit_columns(table, [cells])
        for column, value in zip(table.columns, cells, strict=False):
            table.update_cell(repo_id, column, value)

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self._select(event.row_key.value)

    @on(DataTable.RowSelected)
    def _row_chosen(self, event: DataTable.RowSelected) -> None:
        """Enter or a click: open a model that is here; ask before downloading one."""
        row = self.rows.get(event.row_key.value or "")
        if row is not None and row.cached:
            self.action_open()
        else:
            self._request_download(ask=True)

    def _select(self, repo_id: str) -> None:
        """Show it; ask the Hub for exact sizes and what is cached, once per visit."""
        self.selected = repo_id
        self._update_detail()
        estimate = self.estimates.get(repo_id)
        row = self.rows.get(repo_id)
        if row is not None and (estimate is None or not (estimate.planned or row.cached)):
            self._estimate(row)

    @on(Input.Submitted, "#repo-id")
    @on(Button.Pressed, "#check")
    def _check_typed(self) -> None:
        """A Hub id (checked with the Hub) or a model folder (opens as it is)."""
        repo_id = self.query_one("#repo-id", Input).value.strip()
        problem = downloads.check_model_name(repo_id)
        if problem:
            self.notify(problem, severity="warning")
            return
        folder = downloads.local_folder(repo_id)
        if folder is not None:
            repo_id = str(folder)
        if repo_id not in self.rows:
            if folder is not None:
                row = downloads.folder_row(folder, custom=True)
            else:
                row = downloads.ModelRow(repo_id=repo_id, label=repo_id, custom=True)
            self.rows[repo_id] = row
            cells = self._cells(row)
            fit_columns(self.query_one(DataTable), [cells])
            self.query_one(DataTable).add_row(*cells, key=repo_id)
        table = self.query_one(DataTable)
        table.move_cursor(row=table.get_row_index(repo_id))
        table.focus()  # Ctrl+D and friends act on the list (in the Input they edit text)
        self.estimates.pop(repo_id, None)
        self._select(repo_id)

    # -- size, free disk and verdict (worker) -------------------------------------------

    def _estimate(self, row: downloads.ModelRow) -> None:
        self._ask_estimate(row, self._epoch)

    @work(thread=True, group="estimate", exit_on_error=False)
    def _ask_estimate(self, row: downloads.ModelRow, epoch: int) -> None:
        config = self.app.config
        total = config.machine().total_bytes
        try:
            estimate = downloads.estimate(config, self.app.settings, row, total, config.speed())
        except Exception as e:
            estimate = downloads.Estimate(error=str(e) or type(e).__name__)
        self.app.call_from_thread(self._estimate_ready, row.repo_id, estimate, epoch)

    def _estimate_ready(self, repo_id: str, estimate: downloads.Estimate, epoch: int) -> None:
        if epoch != self._epoch:
            return  # asked before the estimates were reset: the budget may have changed
        self.estimates[repo_id] = estimate
        row = self.rows.get(repo_id)
        if row is not None and estimate.size_bytes and not row.size_bytes:
            row.size_bytes = estimate.size_bytes
        if row is not None and estimate.sizes is not None:
            row.sizes = estimate.sizes  # the Hub's exact sizes, for the detail panel
        self._refresh_row(repo_id)
        if repo_id == self.selected:
            self._update_detail()
        if self._pending is not None and self._pending[0] == repo_id:
            ask = self._pending[1]
            self._pending = None
            if estimate.planned and repo_id == self.selected:
                self._request_download(ask)
            elif estimate.error:
                self.notify(estimate.error, title="Cannot download", severity="error",
                            timeout=10)  # fmt: skip

    # -- the detail panel ---------------------------------------------------------------

    def _update_detail(self) -> None:
        detail = self.query_one("#model-detail", Static)
        row = self.rows.get(self.selected or "")
        busy = self.downloading is not None
        self.query_one("#download", Button).disabled = busy or row is None or row.cached
        self.query_one("#cancel", Button).display = busy
        self.query_one("#open", Button).disabled = row is None or not row.cached
        self.set_class(busy, "-downloading")
        if row is None:
            hint = "Pick a model, or type a Hub id or a model folder below."
            detail.update(Text(hint, style="dim"))
            return
        detail.update(downloads.describe(row, self.estimates.get(row.repo_id)))

    # -- downloading --------------------------------------------------------------------

    def action_download(self) -> None:
        """Ctrl+D or the button: starts at once, unless the model is judged too large."""
        self._request_download(ask=False)

    def _request_download(self, ask: bool) -> None:
        row = self.rows.get(self.selected or "")
        if row is None:
            return
        if self.downloading is not None:
            self.notify(f"Already downloading {self.downloading}.", severity="warning")
            return
        if row.cached:
            self.notify(f"{row.repo_id} is already here: Ctrl+O opens it.")
            return
        estimate = self.estimates.get(row.repo_id)
        if estimate is not None and estimate.error and not estimate.planned:
            # The Hub may be back: ask again rather than repeat the old answer.
            self.notify(f"{estimate.error} Asking the Hub again…", title="Cannot download",
                        severity="error", timeout=10)  # fmt: skip
            self._estimate(row)
            return
        if estimate is not None and estimate.disk_problem:
            self.notify(estimate.disk_problem, title="Not enough disk", severity="error",
                        timeout=12)  # fmt: skip
            return
        if estimate is None or not estimate.planned:  # no size from the Hub yet: ask first
            self._pending = (row.repo_id, ask)
            self.notify(f"Asking the Hub what {row.repo_id} will take…")
            self._estimate(row)
            return
        if ask or (estimate is not None and estimate.verdict == "too_large"):
            repo_id = row.repo_id

            def answered(yes: bool | None) -> None:
                if yes and self.selected == repo_id:
                    self._start_download(repo_id)

            self._asking = True
            self.app.push_screen(ConfirmDownload(row, estimate), answered)
            return
        self._start_download(row.repo_id)

    def _start_download(self, repo_id: str) -> None:
        row = self.rows.get(repo_id)
        if row is None or row.cached or self.downloading is not None:
            return
        estimate = self.estimates.get(repo_id)
        self.downloading = row.repo_id
        self._cancel = threading.Event()
        bar = self.query_one("#download-bar", ProgressBar)
        bar.update(total=(estimate.size_bytes or None) if estimate else None, progress=0)
        self.query_one("#download-status", Label).update(f"Starting {row.repo_id}…")
        self._update_detail()
        self._download(row.repo_id, self._cancel)

    @work(thread=True, exclusive=True, group="download", exit_on_error=False)
    def _download(self, repo_id: str, cancel: threading.Event) -> None:
        def progress(done: int, total: int) -> None:  # throttled by the fetch loop
            self.post_message(DownloadProgress(done, total))

        try:
            downloads.download(self.app.config, repo_id, progress, cancel)
        except downloads.Cancelled:
            self.post_message(DownloadFinished(repo_id, "cancelled"))
        except downloads.DownloadError as e:
            self.post_message(DownloadFinished(repo_id, "failed", str(e)))
        except Exception as e:
            self.post_message(DownloadFinished(repo_id, "failed", str(e) or type(e).__name__))
        else:
            status = "cancelled" if cancel.is_set() else "done"
            self.post_message(DownloadFinished(repo_id, status))

    def on_download_progress(self, message: DownloadProgress) -> None:
        bar = self.query_one("#download-bar", ProgressBar)
        bar.update(total=message.total_bytes or None, progress=message.done_bytes)
        total = f" / {size(message.total_bytes)}" if message.total_bytes else ""
        self.query_one("#download-status", Label).update(
            f"{self.downloading}: {size(message.done_bytes)}{total}"
        )

    def on_download_finished(self, message: DownloadFinished) -> None:
        self.downloading = None
        status = self.query_one("#download-status", Label)
        status.set_class(message.status == "failed", "-error")
        if message.status == "done":
            status.update(f"Downloaded {message.repo_id}.")
            self.app.notify(f"{message.repo_id} is ready: Ctrl+O opens it in the chat.",
                            title="Download complete")  # fmt: skip
        elif message.status == "cancelled":
            status.update(f"Cancelled {message.repo_id}: downloading again resumes where it "
                          "stopped.")  # fmt: skip
            self.app.notify("Download again to resume where it stopped.",
                            title=f"Cancelled {message.repo_id}")  # fmt: skip
        else:
            status.update(f"Failed: {message.error}")
            self.app.notify(message.error, title=f"Download of {message.repo_id} failed",
                            severity="error", timeout=15)  # fmt: skip
        self.estimates.pop(message.repo_id, None)
        self.action_refresh()

    def action_cancel(self) -> None:
        if self.downloading is not None:
            self.cancel_download()
            self.query_one("#download-status", Label).update("Cancelling…")

    def cancel_download(self) -> None:
        """Safe from anywhere, even once the app has exited (touches no widget)."""
        self._cancel.set()

    @on(Button.Pressed, "#download")
    def _download_pressed(self) -> None:
        self.action_download()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    # -- opening ------------------------------------------------------------------------

    @on(Button.Pressed, "#open")
    def action_open(self) -> None:
        row = self.rows.get(self.selected or "")
        if row is None or not row.cached:
            self.notify("Download it first (Ctrl+D).", severity="warning")
            return
        self.app.open_model(row.open_name)
        self.app.pop_screen()

    def action_back(self) -> None:
        self.app.pop_screen()
