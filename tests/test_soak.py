"""The soak, short (scripts/soak.py runs 5,000 tokens and 200 turns): several replies at
the minimum budget and several chat turns, with memory, open files and threads flat
after warm-up and the tokens equal to stock mlx-lm's."""

from __future__ import annotations

import soak_checks
from soak_checks import soak_app, soak_engine, stock_chat_replies, stock_outputs

from mlx_pager.settings import Settings, save_settings

REPLIES, TOKENS = 3, 100


def test_replies_at_the_minimum_budget_stay_flat_and_exact():
    soak = soak_engine(REPLIES, TOKENS)
    assert soak.outputs == stock_outputs(REPLIES, TOKENS)
    assert soak.spread(TOKENS, "fds") == 0 and soak.spread(TOKENS, "threads") == 0
    grown = soak.samples[-1].rss - soak.after_warmup(TOKENS)[0].rss
    assert grown < 8 * 10**6, f"resident memory grew {grown / 1e6:.1f} MB in 200 tokens"


async def test_chat_turns_stay_flat_and_are_all_saved(tmp_path):
    from mlx_pager_app.conversations import conversations_dir, list_conversations

    settings = tmp_path / "settings.toml"
    save_settings(Settings(context_length=4096), settings)
    soak, firsts = await soak_app(6, 3, tmp_path / "data", settings)
    assert soak.spread(3, "fds") == 0 and soak.spread(3, "threads") == 0
    chats = list_conversations(conversations_dir(tmp_path / "data"))
    assert sorted(len(c.messages) for c in chats) == [6, 6]
    assert [r for _, r in firsts] == stock_chat_replies([p for p, _ in firsts], 8)
    assert len(soak_checks.PROMPTS) >= 6
