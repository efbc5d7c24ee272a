"""Weight files that change under a running model: truncated, replaced or deleted
mid-generation (another download, a disk cleaner), or a read that fails outright.

The reply fails with a message naming the file and what to do; the process survives
(the mmap path never touches a page past the end: no SIGBUS); the expert cache stays
consistent; once the file is back, the next reply is the reply it would have been.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from checkpoints import budget_for_slots

from mlx_pager.engine import Engine
from mlx_pager.sim.synthetic import make_checkpoint
from mlx_pager.storage import readers
from mlx_pager.storage.checkpoint import read_header
from mlx_pager.storage.readers import ExpertReadError

PROMPT = "The experts of a mixture"
TOKENS = 24


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("src") / "m", "qwen3_moe", num_experts=16)


@pytest.fixture(scope="module")
def budget(source):
    return budget_for_slots(source, 4, 4096)  # 4 of 16 experts: misses on every token


@pytest.fixture(scope="module")
def expected(source, budget):
    engine = Engine.open(str(source), budget=budget)
    try:
        return reply(engine)
    finally:
        engine.close()


def reply(engine: Engine, stop_after: int | None = None, then=None) -> list[int]:
    tokens = []
    for chunk in engine.generate(PROMPT, TOKENS, chat_template=False, ignore_eos=True):
        tokens.append(chunk.token)
        if stop_after is not None and len(tokens) == stop_after:
            then()
    return tokens


def check_consistent(engine: Engine) -> None:
    """Every slot either free or holding exactly the key that maps to it."""
    cache = engine.paged.cache
    held = {slot: key for key, slot in cache.slot_of.items()}
    assert len(held) == len(cache.slot_of), "two keys share a slot"
    assert set(held).isdisjoint(cache.free), "a slot both free and held"
    assert set(held) | set(cache.free) == set(range(cache.slots)), "a slot was lost"
    assert len(cache.free) == len(set(cache.free))
    for slot in range(cache.slots):
        assert cache.key_in[slot] == held.get(slot)


@pytest.fixture
def model(source, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(source, path)
    return path


@pytest.mark.parametrize("read_path", ["pread", "mmap", "direct"])
def test_truncated_mid_reply_then_restored(model, budget, expected, read_path):
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    header_end = min(t.offset for t in read_header(weights).values())
    engine = Engine.open(str(model), budget=budget, read_path=read_path)
    try:
        with pytest.raises(ExpertReadError) as e:
            reply(engine, stop_after=3, then=lambda: os.truncate(weights, header_end))
        message = str(e.value)
        assert str(weights) in message and "Restore it" in message
        check_consistent(engine)
        with pytest.raises(ExpertReadError):  # still truncated: fails again, cleanly
            reply(engine)
        check_consistent(engine)
        with open(weights, "r+b") as f:  # restored in place (same inode)
            f.write(original)
        assert reply(engine) == expected
        check_consistent(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("read_path", ["pread", "mmap", "direct"])
def test_deleted_and_downloaded_again_is_reopened(model, budget, expected, read_path):
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    engine = Engine.open(str(model), budget=budget, read_path=read_path)
    try:

        def replace_with_a_truncated_copy():
            os.truncate(weights, 100)  # the old inode, still open, loses its data
            weights.unlink()
            weights.write_bytes(original[: len(original) // 2])  # a download under way

        with pytest.raises(ExpertReadError):
            reply(engine, stop_after=2, then=replace_with_a_truncated_copy)
        check_consistent(engine)
        with pytest.raises(ExpertReadError, match="replaced by a file with other tensors"):
            reply(engine)  # the half file is not the same tensors: not reopened
        weights.unlink()
        weights.write_bytes(original)  # the download finished: a new inode, same file
        assert reply(engine) == expected
        check_consistent(engine)
    finally:
        engine.close()


def test_read_errors_fail_the_reply_not_the_process(model, budget, expected, monkeypatch):
    engine = Engine.open(str(model), budget=budget, read_path="pread")
    try:
        real = os.preadv

        def failing(*args, **kwargs):
            raise OSError(errno.EIO, "Input/output error")

        with monkeypatch.context() as m:
            m.setattr(readers.os, "preadv", failing)
            with pytest.raises(ExpertReadError, match="Input/output error") as e:
                reply(engine)
        assert str(model / "model.safetensors") in str(e.value)
        assert readers.os.preadv is real
        check_consistent(engine)
        assert reply(engine) == expected
    finally:
        engine.close()


def test_mmap_size_check_errors_fail_the_reply(model, budget, expected, monkeypatch):
    engine = Engine.open(str(model), budget=budget, read_path="mmap")
    try:
        real = os.fstat
        fds = set(engine.paged.cache.reader.fds.values())

        def failing(fd):
            if fd in fds:
                raise OSError(errno.EIO, "Input/output error")
            return real(fd)

        with monkeypatch.context() as m:
            m.setattr(readers.os, "fstat", failing)
            with pytest.raises(ExpertReadError, match="Input/output error"):
                reply(engine)
        check_consistent(engine)
        assert reply(engine) == expected
    finally:
        engine.close()


def test_cli_reports_a_truncated_file_in_one_line(model, budget, capsys, monkeypatch):
    from mlx_pager.cli import main

    weights = model / "model.safetensors"
    header_end = min(t.offset for t in read_header(weights).values())
    real_open = Engine.open

    def open_then_truncate(*args, **kwargs):
        engine = real_open(*args, **kwargs)
        os.truncate(weights, header_end)
        return engine

    monkeypatch.setattr(Engine, "open", open_then_truncate)
    code = main(
        ["generate", "--model", str(model), "-p", PROMPT, "--budget", str(budget),
         "--ignore-chat-template", "-m", "8"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("mlx-pager: error:") == 1 and str(weights) in err


async def test_app_reports_a_truncated_file_and_recovers(source, tmp_path):
    """In the app: the turn fails with the file's name, the prompt comes back, the app
    stays usable, and once the file is restored the same prompt gets its reply."""
    from app_fixtures import wait_for, wait_ready
    from mlx_pager_app.main import create_app
    from mlx_pager_app.widgets.prompt import PromptInput

    from mlx_pager.machine import MachineMemory
    from mlx_pager.settings import Settings, save_settings

    model = tmp_path / "m"
    shutil.copytree(source, model)
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    header_end = min(t.offset for t in read_header(weights).values())
    settings = tmp_path / "settings.toml"
    save_settings(Settings(budget=str(budget_for_slots(model, 4, 256)), context_length=256),
                  settings)  # fmt: skip
    app = create_app(settings_path=settings, data_dir=tmp_path / "data", model=str(model),
                     default_model=lambda: str(model), max_tokens=12,
                     machine=lambda: MachineMemory(16 * 10**9, 9 * 10**9))  # fmt: skip
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        screen = app.screen
        os.truncate(weights, header_end)
        await pilot.press(*"hello experts", "enter")
        await wait_for(pilot, lambda: not screen.generating)
        assert screen.conversation.messages == []
        assert screen.query_one(PromptInput).value == "hello experts"
        assert any(str(weights) in n.message for n in app._notifications)
        with open(weights, "r+b") as f:
            f.write(original)
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(screen.conversation.messages) == 2)
        await wait_for(pilot, lambda: not screen.generating)
        assert screen.conversation.messages[-1]["role"] == "assistant"
