"""The chat: streamed markdown replies, a prompt with history, live stats and heatmap."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Button, Header, Markdown, Static
from textual.widgets.markdown import MarkdownStream
from textual.worker import get_current_worker

from mlx_pager.serve.state import ServerState, running_server

from ..conversations import Conversation, conversations_dir, save_conversation
from ..messages import ReplyFailed, ReplyFinished, ReplyUpdated
from ..text import clean, model_label
from ..widgets.chat_message import AssistantMessage, UserMessage
from ..widgets.footer import Footer
from ..widgets.heatmap import ExpertHeatmap
from ..widgets.prompt import PromptInput
from ..widgets.render_caches import release_render_caches
from ..widgets.stats_panel import PanelState, StatsPanel

if TYPE_CHECKING:
    from textual.widget import Widget

    from mlx_pager.budget import BudgetPlan
    from mlx_pager.engine import Engine, ModelInfo

SERVER_CHECK_SECONDS = 2.0

WELCOME = (
    "**Ask anything.** Enter sends · Ctrl+J new line · ↑/↓ earlier prompts · "
    "Esc stops the reply · Ctrl+N new chat · Ctrl+O saved chats · F2 models · F3 memory budget"
)


def short_verdict(info: ModelInfo, plan: BudgetPlan) -> str:
    """One line for the status bar: the model's shape and how much of it stays resident."""
    if not info.moe_layers:
        return "dense model, fully resident"
    shape = f"{info.moe_layers}×{info.experts_per_layer} experts, top-{info.top_k}"
    # Experts are read from disk on first use either way: say what fits, not what is loaded.
    if plan.verdict == "fits":
        return f"{shape} · all fit, loaded as used"
    return f"{shape} · paged: {plan.slots} of {plan.num_experts} fit, loaded as used"


FINISH_NOTES = {"length": "stopped at the token limit", "cancelled": "stopped"}


class ReplyBuffer:
    """Text the worker produced that the UI has not shown yet (shared across threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._pending = False

    def push(self, text: str) -> bool:
        """Add text; True when the UI must be told (no notice is pending already)."""
        with self._lock:
            self._parts.append(text)
            if self._pending:
                return False
            self._pending = True
            return True

    def drain(self) -> str:
        with self._lock:
            text = "".join(self._parts)
            self._parts.clear()
            self._pending = False
            return text


class ChatScreen(Screen):
    """Generation runs on a thread worker that posts messages; the UI never waits on it."""

    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "open_chat", "Saved chats"),
        Binding("ctrl+b", "toggle_panel", "Stats panel"),
    ]

    generating: reactive[bool] = reactive(False)

    def __init__(self) -> None:
        super().__init__()
        self.conversation = Conversation()
        self._stream: MarkdownStream | None = None
        self._reply: AssistantMessage | None = None
        self._asked: UserMessage | None = None  # the prompt of the reply in progress
        self._reply_text = ""
        self._buffer = ReplyBuffer()
        self._stop_asked = threading.Event()  # Esc during this reply, kept for the worker
        self._stats_dirty = True
        self._prepare_timer: Timer | None = None
        self._server: ServerState | None = None  # `mlx-pager serve` on the same data folder

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-body"):
            with Vertical(id="chat-column"):
                yield Static("", id="model-status", markup=False)
                yield Static("", id="error-panel", markup=False)
                with VerticalScroll(id="messages"):
                    yield Markdown(WELCOME, id="welcome")
                with Horizontal(id="prompt-row"):
                    yield PromptInput(id="prompt")
                    yield Button("Send", id="send", variant="primary")
                    yield Button("Stop", id="stop", variant="error")
            with VerticalScroll(id="side-panel"):
                yield StatsPanel(id="stats")
                yield Static("Experts fired", classes="panel-title")
                yield ExpertHeatmap(id="heatmap")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "engine_state", self._engine_changed)
        self.set_interval(self.app.config.stats_interval, self.refresh_stats)
        self._check_server()
        self.set_interval(SERVER_CHECK_SECONDS, self._check_server)
        self.query_one(PromptInput).focus()

    # -- engine state ---------------------------------------------------------------------

    def _check_server(self) -> None:
        """Show a server running from the same settings: a small file, read every few s."""
        server = running_server(self.app.data_dir)
        if server != self._server:
            self._server = server
            self._engine_changed()

    def _engine_changed(self, _state: object = None) -> None:
        app = self.app
        status = self.query_one("#model-status", Static)
        error = self.query_one("#error-panel", Static)
        label = app.model_title
        if app.engine_state.status == "ready" and app.engine is not None:
            info, plan = app.engine.info, app.engine.plan
            line = f"● {label} · {info.model_type} · {short_verdict(info, plan)}"
        elif app.engine_state.status == "opening":
            line = f"◌ opening {label}…"
        else:
            line = f"✕ {label}: not open"
        if self._server is not None:
            line += f" · server running at {self._server.url}"
        status.update(line)
        status.set_class(app.engine_state.status == "ready", "-ready")
        failed = app.engine_state.status == "error"
        error.update(
            f"Could not open {label}.\n{app.engine_state.error}\n\n"
            "F2: pick or download a model · F3: change the memory budget or context length"
            if failed else ""
        )  # fmt: skip
        error.set_class(failed, "-shown")
        self.sub_title = label
        self._stats_dirty = True
        self.refresh_stats()

    # -- stats ----------------------------------------------------------------------------

    def refresh_stats(self) -> None:
        """Read a consistent snapshot on the UI thread; only while something changes."""
        engine = self.app.engine
        if not (self.generating or self._stats_dirty):
            return
        if engine is None:
            self._stats_dirty = False
            self.query_one(StatsPanel).show(None)
            self.query_one(ExpertHeatmap).update_counts(np.zeros((0, 0), np.int64), "no model open")
            return
        self._stats_dirty = False
        snapshot = engine.stats.snapshot()
        settings = self.app.settings
        preload = engine.preload_status
        self.query_one(StatsPanel).show(PanelState(snapshot, settings.prefetch, preload))
        counts = snapshot.expert_counts
        if counts.ndim != 2 or counts.size == 0:
            counts = np.zeros((engine.info.moe_layers, engine.info.experts_per_layer), np.int64)
        self.query_one(ExpertHeatmap).update_counts(counts, "no routed experts: dense model")

    # -- task detection while typing -----------------------------------------------------

    @on(PromptInput.Changed)
    def _draft_changed(self, event: PromptInput.Changed) -> None:
        """Tell the engine the task early, so its hot experts preload while the user types."""
        if self._prepare_timer is not None:
            self._prepare_timer.stop()
        if len(event.text_area.text.strip()) >= 16:
            self._prepare_timer = self.set_timer(0.8, self._prepare_draft)

    def _prepare_draft(self) -> None:
        engine, draft = self.app.engine, self.query_one(PromptInput).value.strip()
        if engine is None or self.generating or not draft:
            return
        messages = [*self.conversation.messages, {"role": "user", "content": draft}]
        self._prepare(engine, messages)

    @work(thread=True, exclusive=True, group="prepare", exit_on_error=False)
    def _prepare(self, engine: Engine, messages: list[dict[str, str]]) -> None:
        if not self.app.engine_lock.acquire(blocking=False):
            return  # generating or reopening: generate() prepares for itself
        try:
            engine.prepare(messages)
        except Exception:
            return
        finally:
            self.app.engine_lock.release()
        self.app.call_from_thread(self._mark_stats_dirty)

    def _mark_stats_dirty(self) -> None:
        self._stats_dirty = True
        self.refresh_stats()

    # -- sending and streaming ------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def _submitted(self) -> None:
        await self.action_send()

    @on(Button.Pressed, "#send")
    async def _send_pressed(self) -> None:
        await self.action_send()

    @on(Button.Pressed, "#stop")
    def _stop_pressed(self) -> None:
        self.action_stop()

    async def action_send(self) -> None:
        prompt_box = self.query_one(PromptInput)
        prompt = prompt_box.value.strip()
        if not prompt:
            return
        if self.generating:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        engine = self.app.engine
        if engine is None:
            what = "is still opening" if self.app.engine_state.status == "opening" else "is open"
            hint = "wait a moment." if self.app.engine_state.status == "opening" else (
                "F2 picks or downloads one, F3 changes the budget.")  # fmt: skip
            self.notify(f"No model {what}: {hint}", severity="warning")
            return
        prompt_box.remember(prompt)
        prompt_box.value = ""
        self.conversation.model = self.app.model_name
        self.conversation.add("user", prompt)
        await self._start_reply(engine, prompt)

    async def _start_reply(self, engine: Engine, prompt: str) -> None:
        self.generating = True  # before any await: a second Enter must not start another
        messages = self.query_one("#messages", VerticalScroll)
        self._remove_welcome()
        reply = AssistantMessage(model=model_label(self.app.model_name))
        self._asked = UserMessage(prompt)
        await messages.mount_all([self._asked, reply])
        reply.set_status("reading the prompt…")
        messages.scroll_end(animate=False)
        self._reply, self._reply_text = reply, ""
        self._buffer = ReplyBuffer()
        self._stream = None
        self._stop_asked = threading.Event()
        self._generate(engine, [dict(m) for m in self.conversation.messages])

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(self, engine: Engine, messages: list[dict[str, str]]) -> None:
        """The worker: the engine applies the chat template to the whole message list."""
        worker = get_current_worker()
        buffer, stop_asked = self._buffer, self._stop_asked
        finish: str | None = None
        with self.app.engine_lock:
            try:
                for chunk in engine.generate(messages, max_tokens=self.app.config.max_tokens):
                    if chunk.text and buffer.push(chunk.text):
                        self.post_message(ReplyUpdated())
                    finish = chunk.finish_reason
                    # Esc may have come before the engine started (waiting for the lock,
                    # reading the prompt): generate() starts afresh, the event remembers.
                    if worker.is_cancelled or stop_asked.is_set():
                        engine.stop()
            except Exception as e:
                self.post_message(ReplyFailed(str(e) or type(e).__name__))
                return
        self.post_message(ReplyFinished(finish))

    async def on_reply_updated(self, _message: ReplyUpdated | None = None) -> None:
        text = self._buffer.drain()
        if self._reply is None or not text:
            return
        if self._stream is None:
            self._reply.set_status("")
            self._stream = Markdown.get_stream(self._reply.markdown)
        self._reply_text += text
        await self._stream.write(clean(text))
        self._follow()

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        await self.on_reply_updated()
        await self._end_stream()
        note = FINISH_NOTES.get(message.finish_reason or "", "")
        if self._reply is not None:
            self._reply.set_status(note)
            if not self._reply_text:
                self._reply.set_status(note or "(empty reply)")
        self.conversation.add("assistant", self._reply_text)
        self._save()
        self._done()

    async def on_reply_failed(self, message: ReplyFailed) -> None:
        """Undo the turn, on screen as in the saved chat, and give the prompt back.

        The conversation never holds a failed turn (the model would read the error as its
        own words next time), so neither does the screen: what is shown is what reloading
        the chat shows. The error stays in the notification; a retry is one key away.
        """
        await self._end_stream()
        failed = self.conversation.messages.pop() if self.conversation.messages else None
        if failed and failed["role"] == "user":
            self.query_one(PromptInput).value = failed["content"]
        await self._remove_turn([w for w in (self._asked, self._reply) if w is not None])
        self.notify(f"{message.error}\nYour prompt is back in the box.",
                    title="Generation failed", severity="error", timeout=12)  # fmt: skip
        self._done()

    async def _remove_turn(self, widgets: list[Widget]) -> None:
        messages = self.query_one("#messages", VerticalScroll)
        await messages.remove_children(widgets)
        if not self.conversation.messages:
            await messages.mount(Markdown(WELCOME, id="welcome"))

    async def _end_stream(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    def _done(self) -> None:
        self.generating = False
        self._reply = self._asked = None
        release_render_caches()
        self._stats_dirty = True
        self.refresh_stats()
        self._follow()

    def _follow(self) -> None:
        messages = self.query_one("#messages", VerticalScroll)
        if messages.max_scroll_y - messages.scroll_y < 6:
            messages.scroll_end(animate=False)

    def watch_generating(self, generating: bool) -> None:
        self.set_class(generating, "-generating")

    def _save(self) -> None:
        try:
            save_conversation(self.conversation, conversations_dir(self.app.data_dir))
        except OSError as e:
            self.notify(f"{e}", title="Conversation not saved", severity="error")

    # -- actions --------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating and self.app.engine is not None:
            self._stop_asked.set()
            self.app.engine.stop()

    async def action_new_chat(self) -> None:
        self.action_stop()
        if self.generating:
            self.notify("Stopping the reply first; press Ctrl+N again.", severity="warning")
            return
        await self.load(Conversation())

    def action_open_chat(self) -> None:
        from .conversations import ConversationsScreen

        if self.generating:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return

        def picked(conversation: Conversation | None) -> None:
            if conversation is not None:
                self.run_worker(self.load(conversation), exclusive=True, group="load")

        self.app.push_screen(ConversationsScreen(conversations_dir(self.app.data_dir)), picked)

    def action_toggle_panel(self) -> None:
        self.toggle_class("-hide-panel")

    async def load(self, conversation: Conversation) -> None:
        """Show a conversation (new or saved); the next prompt continues it."""
        self.conversation = conversation
        messages = self.query_one("#messages", VerticalScroll)
        await messages.remove_children()
        release_render_caches()
        if not conversation.messages:
            await messages.mount(Markdown(WELCOME, id="welcome"))
        label = model_label(conversation.model or self.app.model_name)
        widgets = [
            UserMessage(m["content"]) if m["role"] == "user"
            else AssistantMessage(m["content"], model=label)
            for m in conversation.messages
        ]  # fmt: skip
        if widgets:
            await messages.mount_all(widgets)
        prompt = self.query_one(PromptInput)
        for m in conversation.messages:
            if m["role"] == "user":
                prompt.remember(m["content"])
        messages.scroll_end(animate=False)
        prompt.focus()

    def _remove_welcome(self) -> None:
        for welcome in self.query("#welcome"):
            welcome.remove()
