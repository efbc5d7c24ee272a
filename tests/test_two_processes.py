"""Two processes at once on the same settings, conversations and Hugging Face cache (the
app and a `generate`, two `generate`s, two downloads): no file is ever half-written, no
conversation is lost, and where one must wait it is told so."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import pytest

ROUNDS = 150


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


WRITE_SETTINGS = """
import sys
from mlx_pager.settings import load_settings, save_settings
who, rounds = sys.argv[1], int(sys.argv[2])
for i in range(rounds):
    s = load_settings().replace(context_length=str(1024 + i), last_model=who * (1 + i % 50))
    save_settings(s)
"""

READ_SETTINGS = """
import sys, time
from mlx_pager.settings import load_settings
seen, end = 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    s = load_settings()  # raises on a half-written file
    assert set(s.last_model) <= {"a", "b"}, s.last_model
    seen += 1
print(seen)
"""


def test_settings_written_by_two_processes_are_never_half_written():
    writers = [spawn(WRITE_SETTINGS, who, str(ROUNDS)) for who in "ab"]
    reader = spawn(READ_SETTINGS, "4")
    for w in writers:
        finish(w)
    assert int(finish(reader)) > 0
    from mlx_pager.settings import load_settings, settings_path

    final = load_settings()
    assert final.context_length == 1024 + ROUNDS - 1
    assert not [p for p in settings_path().parent.iterdir() if p.name != "settings.toml"]


WRITE_CHATS = """
import sys
from mlx_pager_app.conversations import Conversation, conversations_dir, save_conversation
who, rounds = sys.argv[1], int(sys.argv[2])
folder = conversations_dir()
shared = Conversation(id="shared")
for i in range(rounds):
    own = Conversation(id=f"{who}-{i}")
    own.add("user", f"turn {i} of {who}")
    save_conversation(own, folder)
    shared.add("user", f"{who} {i} " + "x" * 2000)  # a larger file, rewritten each time
    save_conversation(shared, folder)
"""

READ_CHATS = """
import sys, time
from mlx_pager_app.conversations import conversations_dir, load_conversation
folder, end, seen = conversations_dir(), time.monotonic() + float(sys.argv[1]), 0
while time.monotonic() < end:
    for path in folder.glob("*.json"):
        try:
            load_conversation(path)  # a half-written file would raise here
        except FileNotFoundError:
            continue
        seen += 1
print(seen)
"""


def test_conversations_saved_by_two_processes_are_all_kept_and_whole():
    from mlx_pager_app.conversations import conversations_dir, list_conversations

    writers = [spawn(WRITE_CHATS, who, str(ROUNDS)) for who in "ab"]
    reader = spawn(READ_CHATS, "4")
    for w in writers:
        finish(w)
    assert int(finish(reader)) > 0
    chats = {c.id: c for c in list_conversations(conversations_dir())}
    assert {f"{w}-{i}" for w in "ab" for i in range(ROUNDS)} <= set(chats)
    assert len(chats["shared"].messages) == ROUNDS  # one writer's whole version, not a mix
    assert not list(conversations_dir().glob(".*"))  # no temporary file left behind


@pytest.mark.slow
def test_two_downloads_of_one_model_one_waits_both_end_whole(hub_server, tmp_path, hf_cache):
    import numpy as np
    from safetensors.numpy import save_file

    model = tmp_path / "model"
    model.mkdir()
    rng = np.random.default_rng(2)
    save_file({"w": rng.integers(0, 2**32, (1024, 1024), dtype=np.uint32)},
              str(model / "model.safetensors"))  # fmt: skip
    (model / "config.json").write_text('{"model_type": "qwen3_moe"}')
    hub_server.add_repo("org/tiny", model)
    hub_server.throttle = 500_000  # 4 MiB in about 8 s: the two runs overlap
    cmd = [sys.executable, "-m", "mlx_pager.cli", "download", "org/tiny",
           "--endpoint", hub_server.endpoint]  # fmt: skip
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HOME": str(hf_cache.parent)}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    blobs = hf_cache / "models--org--tiny" / "blobs"
    deadline = time.monotonic() + 60
    while not (blobs.exists() and list(blobs.glob("*.incomplete"))):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert "Another download of org/tiny is writing" in second.stderr
    assert "wait for it to finish" in second.stderr
    assert second.stderr.count("mlx-pager: error:") == 1
    hub_server.throttle = None
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    snapshot = again.stdout.strip().splitlines()[-1]
    for path in model.iterdir():
        got = open(os.path.join(snapshot, path.name), "rb").read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(path.read_bytes()).digest()
