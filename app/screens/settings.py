"""Memory-budget settings: the budget against the machine, how it divides, the verdict.

The breakdown comes from ``inspect_model`` (builds the model lazily, reads no weights)
on a worker, then ``layout.plan(budget)`` on every keystroke: pure arithmetic.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Header, Input, Label, Select, Static, Switch

from mlx_pager.budget import BudgetPlan
from mlx_pager.machine import budget_warnings
from mlx_pager.settings import (
    AUTO_BUDGET_SHARE,
    COLD_PRECISIONS,
    POLICY_NAMES,
    READ_PATHS,
    Settings,
    check_context_length,
)
from mlx_pager.tasks.coverage import predicted_hit_rate
from mlx_pager.units import parse_bytes

if TYPE_CHECKING:
    from mlx_pager.estimate import ModelLayout

from ..text import heading_colour, model_label, percent, size
from ..widgets.budget_bar import CORE, EXPERTS, HEADROOM, KV, BudgetBar, Part
from ..widgets.footer import Footer

AUTO_TEXT = f"{AUTO_BUDGET_SHARE:.0%} of memory"
READ_PATH_HELP = {"auto": "auto (the engine's pick)", "pread": "pread (buffered reads)",
                  "mmap": "mmap (page faults)", "direct": "direct (O_DIRECT, Linux)"}  # fmt: skip


def budget_text(settings: Settings) -> str:
    """How the budget appears in the box: "auto", or a number of GB."""
    if settings.budget == "auto":
        return "auto"
    gigabytes = parse_bytes(settings.budget) / 1e9
    return f"{gigabytes:g}" if gigabytes >= 1 else settings.budget


def parse_budget(text: str) -> str:
    """The box's text -> the settings' value; a bare number means GB. Raises ValueError."""
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    if not text:
        raise ValueError(f"Type a budget in GB, such as 8, or auto ({AUTO_TEXT}).")
    value = f"{text}GB" if text.replace(".", "", 1).isdigit() else text
    if parse_bytes(value) <= 0:
        raise ValueError("The budget must be more than 0 GB.")
    return value


def plan_parts(plan: BudgetPlan) -> list[Part]:
    return [
        Part("core", plan.resident_bytes, CORE, "resident"),
        Part("experts", plan.cache_bytes, EXPERTS, f"{plan.slots} slots"),
        Part("KV cache", plan.kv_bytes, KV, "at context"),
        Part("headroom", plan.headroom_bytes, HEADROOM),
    ]


class SettingsScreen(Screen):
    """Edit, see the consequence live, Ctrl+S saves and reopens the model if needed."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save & apply"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._layouts: dict[tuple[str, int], ModelLayout] = {}
        self._layout: ModelLayout | None = None  # the layout being planned for
        self._plan: BudgetPlan | None = None

    def compose(self) -> ComposeResult:
        s = self.app.settings
        yield Header()
        with Horizontal(id="settings-body"):
            with VerticalScroll(id="settings-form"):
                yield Label(f"Memory budget: GB, or auto ({AUTO_TEXT})", classes="hint")
                with Horizontal(classes="field-row"):
                    yield Label("Budget")
                    yield Input(budget_text(s), id="budget")
                with Horizontal(classes="field-row"):
                    yield Label("Context (tokens)")
                    yield Input(str(s.context_length), id="context_length", type="integer")
                with Horizontal(classes="field-row"):
                    yield Label("Cache policy")
                    yield Select([(p, p) for p in POLICY_NAMES], value=s.policy, allow_blank=False,
                                 id="policy")  # fmt: skip
                with Horizontal(classes="field-row"):
                    yield Label("Read path")
                    yield Select([(READ_PATH_HELP.get(r, r), r) for r in READ_PATHS],
                                 value=s.read_path, allow_blank=False, id="read_path")  # fmt: skip
                with Horizontal(classes="field-row"):
                    yield Label("Cold experts")
                    yield Select([(c, c) for c in COLD_PRECISIONS], value=s.cold_precision,
                                 allow_blank=False, id="cold_precision")  # fmt: skip
                with Horizontal(classes="field-row"):
                    yield Label("Routing margin")
                    yield Input(f"{s.route_margin:g}", id="route_margin", type="number")
                    yield Label("0 exact, to 1 lossy", classes="hint")
                with Horizontal(classes="field-row"):
                    yield Label("Prefetch")
                    yield Switch(s.prefetch, id="prefetch")
                    yield Label("next layer's experts, where measured faster", classes="hint")
                with Horizontal(classes="field-row"):
                    yield Label("Task preload")
                    yield Switch(s.task_preload, id="task_preload")
                    yield Label("experts of the detected task", classes="hint")
                with Horizontal(id="settings-buttons"):
                    yield Button("Save & apply", id="save", variant="primary")
                    yield Button("Back", id="back")
            with VerticalScroll(id="settings-plan"):
                yield Static(id="machine")
                yield Label("", id="plan-title", classes="panel-title")
                yield BudgetBar(id="plan-bar")
                yield Static(id="slots")
                yield Static(id="verdict")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "memory budget"
        self._show_machine()
        self._inspect()
        self.query_one("#budget", Input).focus()

    # -- the machine ------------------------------------------------------------------------

    def _show_machine(self) -> None:
        m = self.app.config.machine()
        text = Text()
        text.append("This machine\n", style=f"bold {heading_colour(self)}")
        text.append(f" total memory      {size(m.total_bytes)}\n")
        text.append(f" available now     {size(m.available_bytes)}\n")
        gpu = size(m.gpu_limit_bytes) if m.gpu_limit_bytes else "— (no Metal GPU)"
        text.append(f" GPU working set   {gpu}")
        self.query_one("#machine", Static).update(text)

    # -- the model's layout (worker) ------------------------------------------------------

    def _context_length(self) -> int | None:
        """The typed context length, or None where the settings' rule refuses it."""
        try:
            return check_context_length(self.query_one("#context_length", Input).value)
        except ValueError:
            return None

    def _open_model_path(self) -> Path | None:
        engine = self.app.engine
        return engine.info.path if engine is not None else None

    def _current_key(self) -> tuple:
        return (str(self._open_model_path() or self.app.model_name), self._context_length())

    def _inspect(self) -> None:
        context = self._context_length()
        path = self._open_model_path()
        if context is None:
            try:
                check_context_length(self.query_one("#context_length", Input).value)
            except ValueError as e:
                self._show_plan(str(e))
            return
        key = self._current_key()
        if key in self._layouts:
            self._layout = self._layouts[key]
            self._show_plan()
            return
        self.query_one("#plan-title", Label).update("Reading the model's layout…")
        self._inspect_worker(path, self.app.model_name, context, key)

    @work(thread=True, exclusive=True, group="inspect", exit_on_error=False)
    def _inspect_worker(self, path: Path | None, name: str, context: int, key: tuple) -> None:
        from mlx_pager.estimate import inspect_local
        from mlx_pager.hub.resolve import resolve_model

        try:
            if path is None:
                path = resolve_model(name, cache_dir=self.app.config.hub_cache_dir)
            layout = inspect_local(path, context)
        except Exception as e:
            self.app.call_from_thread(self._layout_failed, key, str(e) or type(e).__name__)
            return
        self.app.call_from_thread(self._layout_ready, key, layout)

    def _layout_ready(self, key: tuple, layout: ModelLayout) -> None:
        self._layouts[key] = layout
        if key == self._current_key():  # typing "4096" asks for 409 first: keep the last
            self._layout = layout
            self._show_plan()

    def _layout_failed(self, key: tuple, error: str) -> None:
        if key != self._current_key():
            return
        self._layout = None
        self._show_plan(f"No model to plan for: {error}")

    # -- the plan -------------------------------------------------------------------------

    def _budget_bytes(self) -> int:
        """The typed budget in bytes, by the settings' own rule ("auto": a share)."""
        value = parse_budget(self.query_one("#budget", Input).value)
        budget = Settings().replace(budget=value)
        return budget.budget_bytes(self.app.config.machine().total_bytes)

    def _show_plan(self, problem: str = "") -> None:
        title = self.query_one("#plan-title", Label)
        bar = self.query_one(BudgetBar)
        slots = self.query_one("#slots", Static)
        verdict = self.query_one("#verdict", Static)
        self._plan = None
        if not problem and self._layout is None:
            return
        if not problem:
            try:
                budget = self._budget_bytes()
            except ValueError as e:
                problem = str(e)
        verdict.set_classes("-too_large" if problem else "")
        if problem:
            bar.update_parts([], 0)
            slots.update("")
            verdict.update(Text(problem))
            return
        layout = self._layout
        plan = layout.plan(budget)
        self._plan = plan
        title.update(f"{model_label(self.app.model_name)} at {self._context_length():,} tokens")
        bar.update_parts(plan_parts(plan), budget)
        slots.update(self._slots_text(plan))
        verdict.set_classes(f"-{plan.verdict}")
        verdict.update(self._verdict_text(plan))

    def _slots_text(self, plan: BudgetPlan) -> Text:
        text = Text()
        if plan.num_experts == 0:
            text.append("No routed experts: the whole model stays resident.")
            return text
        text.append("Expert slots      ", style="dim")
        text.append(f"{plan.slots} of {plan.num_experts} ({plan.expert_fraction:.0%})\n")
        text.append("One expert        ", style="dim")
        text.append(f"{size(plan.expert_bytes)}\n")
        text.append("Predicted hit     ", style="dim")
        hit, source = self._predicted_hit(plan.slots)
        if hit is None:
            text.append("no profile yet (chat first: the heatmap is the profile)", style="dim")
        else:
            text.append(f"{percent(hit)}", style="bold")
            text.append(f" of {source}", style="dim")
        return text

    def _predicted_hit(self, slots: int) -> tuple[float | None, str]:
        """From this session's activations; else from the task profiles saved by earlier
        sessions (the engine loads them at open), so a restart does not forget."""
        engine = self.app.engine
        if engine is None:
            return None, ""
        hit = predicted_hit_rate(engine.stats.snapshot().expert_counts, slots)
        if hit is not None:
            return hit, "this session's activations"
        profiles = engine.profiles
        saved = list(profiles.counts.values()) if profiles is not None else []
        if not saved:
            return None, ""
        return predicted_hit_rate(sum(saved), slots), "the saved profile's activations"

    def _verdict_text(self, plan: BudgetPlan) -> Text:
        text = Text(plan.explain())
        if plan.verdict == "paged" and self._layout is not None:
            from mlx_pager.estimate import judge_plan

            layout = self._layout
            machine = self.app.config.speed(measure=False)  # cached only: the UI thread
            found = judge_plan(plan, layout.moe_layers, layout.experts_per_layer,
                               machine=machine)  # fmt: skip
            estimate = found.tokens_per_second
            if estimate:
                text.append(f"\nAbout {estimate:.1f} tokens/s ({found.speed_basis}; an "
                            "estimate, the chat measures it).", style="dim")  # fmt: skip
            else:
                text.append(
                    "\nSpeed: estimate pending (the Models screen measures this machine).",
                    style="dim",
                )
        for warning in budget_warnings(plan.budget_bytes, self.app.config.machine()):
            text.append(f"\n{warning}", style="#e5a50a")
        return text

    @on(Input.Changed, "#budget")
    def _budget_changed(self) -> None:
        self._show_plan()

    @on(Input.Changed, "#context_length")
    def _context_changed(self) -> None:
        self._inspect()

    # -- saving ---------------------------------------------------------------------------

    def _collect(self) -> Settings:
        """The form as Settings; ValueError says which field is wrong and how."""

        def value(widget_id: str) -> object:
            widget = self.query_one(f"#{widget_id}")
            return widget.value  # type: ignore[attr-defined]

        return self.app.settings.replace(
            budget=parse_budget(self.query_one("#budget", Input).value),
            context_length=self.query_one("#context_length", Input).value or "0",
            policy=value("policy"),
            read_path=value("read_path"),
            cold_precision=value("cold_precision"),
            route_margin=self.query_one("#route_margin", Input).value or "0",
            prefetch=value("prefetch"),
            task_preload=value("task_preload"),
        )

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        try:
            new = self._collect()
        except ValueError as e:
            self.notify(str(e), title="Not saved", severity="error", timeout=8)
            return
        if self._plan is not None and self._plan.verdict == "too_large":
            self.notify(
                f"{self._plan.explain()} Raise the budget or lower the context length.",
                title="Budget too small: not saved", severity="error", timeout=10,
            )  # fmt: skip
            return
        if self.app.apply_settings(new):
            reopen = self.app.engine_state.status == "opening"
            self.notify("Reopening the model with the new settings…" if reopen else
                        "Saved.", title="Settings saved")  # fmt: skip
            self.app.pop_screen()

    @on(Button.Pressed, "#back")
    def action_back(self) -> None:
        self.app.pop_screen()
