"""The chat screen on a real engine (tiny random checkpoint): stream, stop, history, saves."""

from __future__ import annotations

import json

import pytest
from app_fixtures import *  # noqa: F403
from app_fixtures import wait_for, wait_ready
from mlx_pager_app.conversations import conversations_dir, list_conversations
from mlx_pager_app.screens.chat import ChatScreen
from mlx_pager_app.text import clean, size
from mlx_pager_app.widgets.chat_message import AssistantMessage, UserMessage
from mlx_pager_app.widgets.heatmap import ExpertHeatmap
from mlx_pager_app.widgets.prompt import PromptInput
from mlx_pager_app.widgets.stats_panel import StatsPanel
from textual import events
from textual.widgets import Markdown


def reply_source(screen: ChatScreen) -> str:
    replies = screen.query(AssistantMessage)
    return replies.last().markdown.source if replies else ""


async def test_prompt_streams_reply_and_live_stats(make_app, tmp_path):
    app = make_app(max_tokens=24)
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        assert app.engine_state.status == "ready"
        assert "tiny-moe" in str(screen.query_one("#model-status").render())
        await pilot.press(*"hello experts", "enter")
        await wait_for(pilot, lambda: len(screen.conversation.messages) == 2)
        await pilot.pause()

        messages = screen.conversation.messages
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[0]["content"] == "hello experts"
        reply = messages[1]["content"]
        assert reply and reply_source(screen) == clean(reply)

        # The engine's own greedy reply to the same message list: the app adds nothing.
        expected = "".join(c.text for c in app.engine.generate(messages[:1], max_tokens=24))
        assert reply == expected

        panel = screen.query_one(StatsPanel)
        stats = panel.state.stats
        assert stats.generation_tokens == 24 and stats.decode_tps > 0
        assert stats.hits + stats.misses > 0 and stats.ttft_seconds > 0
        # The KV cache: what the reply filled, beside what the budget reserves for it.
        assert 0 < stats.kv_used_bytes <= stats.kv_bytes
        assert f"{size(stats.kv_used_bytes)} used of {size(stats.kv_bytes)}" in " ".join(
            str(panel.render_line(y).text) for y in range(panel.size.height)
        )
        heat = screen.query_one(ExpertHeatmap).counts
        assert heat.shape == (2, 8) and heat.sum() > 0

        saved = list_conversations(conversations_dir(tmp_path / "data"))
        assert len(saved) == 1 and saved[0].messages == messages
        raw = json.loads(next((tmp_path / "data" / "conversations").glob("*.json")).read_text())
        assert raw["messages"][0] == {"role": "user", "content": "hello experts"}


async def test_stop_keeps_ui_live_and_partial_reply(make_app, long_context):
    app = make_app(max_tokens=4000)
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        await pilot.press(*"hello experts", "enter")  # greedy: ~1600 tokens to EOS
        # Text shows while the worker is still generating: streamed, not at the end.
        await wait_for(pilot, lambda: len(reply_source(screen)) > 10)
        assert screen.generating
        assert screen.query_one("#stop").display and not screen.query_one("#send").display
        # The UI takes keys meanwhile (Pilot waits for idle after each key, so one key:
        # a generating worker keeps the process busy).
        await pilot.press("escape")
        await wait_for(pilot, lambda: not screen.generating)
        assert "stopped" in str(
            screen.query(AssistantMessage).last().query_one(".reply-status").render()
        )
        stats = screen.query_one(StatsPanel).state.stats
        assert 0 < stats.generation_tokens < 1000  # greedy would run to ~1600
        assert screen.conversation.messages[-1]["role"] == "assistant"


async def test_history_new_chat_and_reload(make_app):
    app = make_app(max_tokens=4)
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        for prompt in ("first question", "second question"):
            await pilot.press(*prompt, "enter")
            await wait_for(pilot, lambda: not screen.generating)
        first_id = screen.conversation.id
        box = screen.query_one(PromptInput)
        await pilot.press(*"draft", "up")
        assert box.value == "second question"
        await pilot.press("up", "up")
        assert box.value == "first question"
        await pilot.press("down", "down")
        assert box.value == "draft"

        await pilot.press("ctrl+n")
        await pilot.pause()
        assert screen.conversation.messages == [] and not screen.query(AssistantMessage)

        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.screen is not screen)
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.conversation.id == first_id)
        await pilot.pause()
        assert [m["content"] for m in screen.conversation.messages[::2]] == [
            "first question",
            "second question",
        ]
        assert len(screen.query(AssistantMessage)) == 2
        # The reloaded chat continues: the engine gets the whole list.
        await pilot.press(*"third", "enter")
        await wait_for(pilot, lambda: not screen.generating)
        assert len(screen.conversation.messages) == 6


async def test_missing_model_is_an_error_panel_and_app_stays_usable(make_app, tmp_path):
    app = make_app(model=str(tmp_path / "no-such-model"))
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        assert app.engine_state.status == "error" and app.engine is None
        panel = screen.query_one("#error-panel")
        assert panel.display and "no-such-model" in str(panel.render())
        assert any(n.severity == "error" for n in app._notifications)
        await pilot.press(*"hello", "enter")
        assert not screen.generating
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen is not screen)
        await pilot.press("escape")
        assert app.screen is screen


async def test_budget_too_small_at_open(make_app, settings_file, fixed_bytes):
    from mlx_pager.settings import Settings, save_settings

    save_settings(Settings(budget=str(fixed_bytes - 1), context_length=256), settings_file)
    app = make_app()
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        assert app.engine_state.status == "error"
        assert "below the minimum" in app.engine_state.error
        assert "Raise" in str(app.screen.query_one("#error-panel").render())


def shown_turns(screen: ChatScreen) -> list[str]:
    """The roles of the turns on screen, in order."""
    return [
        "user" if isinstance(w, UserMessage) else "assistant"
        for w in screen.query_one("#messages").children
        if isinstance(w, UserMessage | AssistantMessage)
    ]


async def test_generation_error_is_shown_and_prompt_restored(make_app, tmp_path):
    app = make_app()
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        long_prompt = "word " * 400
        screen.query_one(PromptInput).value = long_prompt
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen.generating)
        assert screen.query_one(PromptInput).value == long_prompt.strip()
        assert screen.conversation.messages == []
        assert any("context length" in n.message for n in app._notifications)
        # The failed turn is gone from the screen too: it shows what a reload shows.
        assert shown_turns(screen) == [] and screen.query("#welcome")
        await pilot.press("ctrl+a", "ctrl+k", *"short", "enter")
        await wait_for(pilot, lambda: not screen.generating)
        assert screen.conversation.messages[-1]["role"] == "assistant"

        # A failure later in a chat: screen, conversation and saved file still agree.
        screen.query_one(PromptInput).value = long_prompt
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen.generating)
        assert screen.query_one(PromptInput).value == long_prompt.strip()
        roles = [m["role"] for m in screen.conversation.messages]
        assert roles == ["user", "assistant"] and shown_turns(screen) == roles
        (saved,) = list_conversations(conversations_dir(tmp_path / "data"))
        assert saved.messages == screen.conversation.messages
        await screen.load(saved)
        await pilot.pause()
        assert shown_turns(screen) == roles


async def test_quit_while_generating_exits_and_closes(make_app):
    app = make_app(max_tokens=4000)
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        engine = app.engine
        await pilot.press(*"hello experts", "enter")
        await wait_for(pilot, lambda: len(reply_source(screen)) > 10)
        await pilot.press("ctrl+q")
    app.shutdown_engine(timeout=10)
    assert app.engine is None and engine._stop.is_set()
    assert engine.stats.generation_tokens < 1000


async def test_delete_a_saved_chat(make_app, tmp_path):
    app = make_app(max_tokens=2)
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        await pilot.press(*"keep me not", "enter")
        await wait_for(pilot, lambda: not screen.generating)
        folder = conversations_dir(tmp_path / "data")
        assert len(list_conversations(folder)) == 1
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.screen is not screen)
        await pilot.press("delete")
        assert list_conversations(folder) == []
        await pilot.press("escape")
        assert app.screen is screen


async def test_task_detected_while_typing(make_app):
    app = make_app()
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        if not app.engine.classify("def fibonacci(n): return n"):
            pytest.skip("no task classifier data (assets/prompts) in this checkout")
        screen = app.screen
        screen.query_one(PromptInput).value = "def fibonacci(n):\n    return n if n < 2 else"
        await wait_for(pilot, lambda: app.engine.stats.task, timeout=10)
        await wait_for(pilot, lambda: screen.query_one(StatsPanel).state.stats.task)
        assert not screen.generating  # nothing was sent: the engine only got ready


async def test_pasted_lines_are_all_sent_and_kept_in_history(make_app):
    app = make_app(max_tokens=2)
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        box = screen.query_one(PromptInput)
        assert app.focused is box
        app.post_message(events.Paste("def f(x):\n    return x\n\nprint(f(1))"))  # a terminal paste
        await pilot.pause()
        assert box.value == "def f(x):\n    return x\n\nprint(f(1))"
        assert box.size.height == 4  # the box grew to show every line
        await pilot.press("ctrl+j", *"# end")  # Ctrl+J adds a line; Enter sends
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen.generating)
        prompt = "def f(x):\n    return x\n\nprint(f(1))\n# end"
        assert screen.conversation.messages[0] == {"role": "user", "content": prompt}
        assert str(screen.query(UserMessage).last().render()) == prompt
        assert box.value == ""
        # History brings the whole prompt back; Up inside it moves the cursor, not history.
        await pilot.press("up")
        assert box.value == prompt and box.cursor_location == (4, 5)
        await pilot.press("up")
        assert box.value == prompt and box.cursor_location[0] == 3
        await pilot.press("down", "down")
        assert box.value == ""


async def test_esc_before_the_engine_starts_still_stops(make_app, long_context):
    """Esc while the reply waits for the engine (held by a reopen, a preload): not lost."""
    app = make_app(max_tokens=4000)
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        app.engine_lock.acquire()
        try:
            await pilot.press(*"hello experts", "enter")
            await wait_for(pilot, lambda: screen.generating)
            await pilot.press("escape")
        finally:
            app.engine_lock.release()
        await wait_for(pilot, lambda: not screen.generating)
        assert screen.conversation.messages[-1]["role"] == "assistant"
        assert app.engine.stats.generation_tokens <= 2  # of the 4000 it would have written


async def test_heatmap_updates_while_the_reply_streams(make_app, long_context):
    app = make_app(max_tokens=4000, stats_interval=0.05)
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        heatmap = screen.query_one(ExpertHeatmap)
        assert heatmap.counts.sum() == 0
        await pilot.press(*"hello experts", "enter")  # greedy: ~1600 tokens to EOS
        await wait_for(pilot, lambda: heatmap.counts.sum() > 0 and len(reply_source(screen)) > 10)
        assert screen.generating
        # Its summary grew from one line to two: the layout made room (header, 2 layers,
        # legend, summary).
        await wait_for(pilot, lambda: heatmap.size.height == 6, timeout=2)
        first = heatmap.counts.copy()
        seen = len(reply_source(screen))
        await wait_for(pilot, lambda: len(reply_source(screen)) > seen + 20)
        await wait_for(pilot, lambda: heatmap.counts.sum() > first.sum())
        assert screen.generating  # both pictures were taken mid-stream
        assert (heatmap.counts >= first).all() and str(heatmap.render()) != ""
        await pilot.press("escape")
        await wait_for(pilot, lambda: not screen.generating)


async def test_bare_first_run_opens_the_embedded_model(tmp_path, monkeypatch):
    """No settings file, no last model, no options: the app factory as the CLI calls it."""
    from mlx_pager_app.main import create_app

    from mlx_pager.engine import DEFAULT_MODEL
    from mlx_pager.settings import Settings

    config, data = tmp_path / "config", tmp_path / "data"
    monkeypatch.setenv("MLX_PAGER_CONFIG_DIR", str(config))
    monkeypatch.setenv("MLX_PAGER_DATA_DIR", str(data))
    app = create_app(max_tokens=2)
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        assert app.settings == Settings()
        assert app.engine_state.status == "ready", app.engine_state.error
        assert app.engine.info.path.resolve() == DEFAULT_MODEL.resolve()
        assert "● tiny-moe" in str(screen.query_one("#model-status").render())
        await pilot.press(*"def fibonacci(n):", "enter")
        await wait_for(pilot, lambda: not screen.generating)
        assert screen.conversation.messages[-1]["role"] == "assistant"
    assert len(list_conversations(conversations_dir(data))) == 1


def shown_paragraphs(reply: AssistantMessage) -> list[str]:
    """The top-level paragraphs of a reply as shown (Textual keeps their class private)."""
    blocks = reply.markdown.children
    return [str(b.render()) for b in blocks if type(b).__name__ == "MarkdownParagraph"]


async def test_reply_keeps_line_breaks_and_shows_html(make_app):
    """Model output as written: newlines break lines, HTML is text; markdown still renders."""
    from mlx_pager_app.conversations import Conversation

    app = make_app()
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        conversation = Conversation()
        conversation.add("user", "show me")
        conversation.add("assistant", "import\nimport <div>x</div>\n\n**bold** and `<b>`\n\n- a")
        await screen.load(conversation)  # a saved reply
        await pilot.pause()
        reply = screen.query(AssistantMessage).last()
        assert shown_paragraphs(reply) == ["import\nimport <div>x</div>", "bold and <b>"]
        assert reply.markdown.query("MarkdownBulletList")

        # A streamed reply goes through the same parser, chunk by chunk.
        streamed = AssistantMessage()
        await screen.query_one("#messages").mount(streamed)
        stream = Markdown.get_stream(streamed.markdown)
        for chunk in ("import", "\nimp", "ort\n<di", "v>"):
            await stream.write(chunk)
        await stream.stop()
        await pilot.pause()
        assert shown_paragraphs(streamed) == ["import\nimport\n<div>"]
