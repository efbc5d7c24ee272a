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


CHATS, TURNS_PER_CHAT, TOKENS_PER_TURN = 3, 2, 8


async def test_chat_turns_stay_flat_and_are_all_saved(tmp_path):
    from mlx_pager_app.conversations import conversations_dir, list_conversations

    settings = tmp_path / "settings.toml"
    save_settings(Settings(context_length=4096), settings)
    soak, firsts = await soak_app(CHATS * TURNS_PER_CHAT, TURNS_PER_CHAT, tmp_path / "data",
                                  settings, TOKENS_PER_TURN)  # fmt: skip
    assert soak.spread(TURNS_PER_CHAT, "fds") == 0
    assert soak.spread(TURNS_PER_CHAT, "threads") == 0
    chats = list_conversations(conversations_dir(tmp_path / "data"))
    assert sorted(len(c.messages) for c in chats) == [2 * TURNS_PER_CHAT] * CHATS
    assert [r for _, r in firsts] == stock_chat_replies([p for p, _ in firsts], TOKENS_PER_TURN)
    assert len(soak_checks.PROMPTS) >= TURNS_PER_CHAT
    # Memory: what the app grew by in the 200-turn soak (0.11 MB a turn, 14 MB per 1,000
    # tokens, against a bar of 1 MB) was widgets of chats gone and their rendered lines,
    # kept. A few turns cannot show 1 MB per 1,000 tokens through resident memory's
    # noise, but they show exactly whether anything of a chat outlives it.
    assert [(kept, caches) for _, kept, caches in soak.kept] == [(0, 0)] * CHATS, soak.kept
