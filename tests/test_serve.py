"""`mlx-pager serve`: mlx-lm's server on the paged model, talked to with the real `openai`
client on a loopback port. The embedded model (assets/tiny-moe) serves in a thread; the
memory test runs the command as a subprocess on a synthetic model 4x its budget."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest
from rss import COMMAND, MB, baseline_script, peak_rss_of

from mlx_pager.cli import build_parser, main
from mlx_pager.engine import Engine
from mlx_pager.serve.server import (
    STATS_PATH,
    BudgetedPromptCache,
    KVShare,
    PagedServer,
    exposure_warning,
)
from mlx_pager.serve.state import running_server
from mlx_pager.settings import Settings
from mlx_pager.sim.synthetic import make_checkpoint
from mlx_pager.stats import Stats

CONTEXT = 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # never the user's settings or profiles
        root = tmp_path_factory.mktemp("serve_user")
        mp.setenv("MLX_PAGER_CONFIG_DIR", str(root / "config"))
        mp.setenv("MLX_PAGER_DATA_DIR", str(root / "data"))
        engine = Engine.open(settings=Settings(context_length=CONTEXT), budget="2GB")
        args = build_parser().parse_args(["serve", "--port", "0"])
        server = PagedServer(engine, args).start()
        yield server
        server.close()
        engine.close()


@pytest.fixture
def client(server) -> openai.OpenAI:
    # No retries: a 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def get_json(server, path: str) -> dict:
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return json.loads(response.read())


def post_raw(server, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


def chat(client, messages, max_tokens=24, stream=False, **kw):
    reply = client.chat.completions.create(
        model="default_model",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=stream,
        **kw,
    )
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    return reply.choices[0].message.content


def test_chat_streamed_and_not_equal_generate(server, client, capsys):
    prompt = "Tell me about the sea and the ships on it."
    messages = [{"role": "user", "content": prompt}]
    streamed = chat(client, messages, stream=True)
    whole = chat(client, messages)
    capsys.readouterr()
    assert main(["generate", "-p", prompt, "-m", "24", "--json", "--context-length", "1024"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert streamed and streamed == whole == expected["text"]

    # The paging stats of that last reply, with the fields `generate --json` prints.
    stats = get_json(server, STATS_PATH)
    assert set(stats) == set(expected["stats"]) == set(Stats().to_dict())
    assert stats["generation_tokens"] == len(expected["tokens"])
    assert stats["prompt_tokens"] > 0 and stats["hits"] + stats["misses"] > 0
    assert 0 < stats["kv_used_bytes"] <= stats["kv_bytes"]


def test_completions_models_health(server, client, capsys):
    listed = client.models.list().data
    assert [m.id for m in listed] == [server.engine.info.name]
    reply = client.completions.create(
        model=listed[0].id, prompt="The sea is", max_tokens=8, temperature=0
    )
    capsys.readouterr()
    args = ["generate", "-p", "The sea is", "-m", "8", "--json", "--ignore-chat-template"]
    assert main([*args, "--context-length", "1024"]) == 0
    assert reply.choices[0].text == json.loads(capsys.readouterr().out)["text"]
    assert reply.usage.completion_tokens == 8
    assert get_json(server, "/health") == {"status": "ok"}


def test_concurrent_clients_get_their_own_replies(server, client):
    prompts = [f"Write about {topic}." for topic in ("rivers", "stars", "bread", "iron")]
    alone = {p: chat(client, [{"role": "user", "content": p}], max_tokens=16) for p in prompts}

    def ask(i: int) -> tuple[str, str]:
        p = prompts[i % 4]
        return p, chat(client, [{"role": "user", "content": p}], max_tokens=16, stream=i % 2 == 0)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert all(text == alone[p] for p, text in together), together
    assert server.prompt_cache.nbytes <= server.kv.kv_bytes


def test_prompt_cache_serves_the_next_turn_within_the_kv_share(server, client):
    # Past half the context: the next turn's KV cache and a copy of this one's would not
    # both fit in the share; the next turn takes the cached entry instead of copying it.
    document = "The colours of the sea change at dusk. " * 70
    first = [{"role": "user", "content": document + "Name three of them."}]
    assert 2 * len(server.engine.encode(first)) > CONTEXT
    reply = chat(client, first, max_tokens=12)
    turn = first + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And at dawn?"},
    ]
    second = client.chat.completions.create(
        model="default_model", messages=turn, max_tokens=12, temperature=0
    )
    assert second.usage.prompt_tokens_details.cached_tokens > CONTEXT // 2
    assert server.prompt_cache.nbytes <= server.kv.kv_bytes

    # A reply that may fill the context: the prompt cache gives way before it starts.
    stream = client.chat.completions.create(
        model="default_model", messages=first, max_tokens=CONTEXT, temperature=0, stream=True
    )
    next(iter(stream))
    need = server.kv.bytes_for(CONTEXT)
    assert server.prompt_cache.nbytes <= max(0, server.kv.kv_bytes - need)
    stream.close()


def test_disconnect_mid_stream_stops_generation(server, client):
    eos = {str(t): -100 for t in server.engine.tokenizer.eos_token_ids}
    stream = client.chat.completions.create(
        model="default_model",
        messages=[{"role": "user", "content": "Go on and on."}],
        max_tokens=900,
        temperature=0,
        stream=True,
        logit_bias=eos,  # no end of text: only the disconnect can stop it early
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    deadline, last = time.monotonic() + 20, -1
    while True:
        time.sleep(0.5)
        now = get_json(server, STATS_PATH)["generation_tokens"]
        if now == last and server.admission.count == 0:
            break
        assert time.monotonic() < deadline, "the generation went on after the client left"
        last = now
    assert 3 <= last < 100
    # The stopped reply's hits are all counted (mlx-lm ends every reply with None, a stop
    # too): none left waiting to be counted in the next reply's stats.
    engine = server.engine
    assert not engine.paged.cache.hits_waiting
    assert engine.stats.decode_hits == engine.stats.hits - engine.paged.run.prefill_counts[0]
    # The server keeps serving.
    assert chat(client, [{"role": "user", "content": "Hello."}], max_tokens=4)


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, client):
    status, body = post_raw(server, b'{"messages": [')
    assert status == 400 and "Invalid JSON" in body["error"]["message"]

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert server.engine.info.name in str(e.value) and "/v1/models" in str(e.value)

    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": "sea " * 2 * CONTEXT}])
    assert "context length 1024" in str(e.value) and "--context-length" in str(e.value)

    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": "hi"}], max_tokens=-5)
    assert "max_tokens must be at least 1" in str(e.value)

    status, body = post_raw(server, json.dumps({"prompt": "x"}).encode())
    assert status == 400 and "messages" in body["error"]["message"]

    assert chat(client, [{"role": "user", "content": "Hello."}], max_tokens=4)
    assert get_json(server, "/health") == {"status": "ok"}


def test_a_full_queue_refuses_with_503(server, client):
    server.admission.max_queued = 0  # one reply at a time, none waiting
    try:
        stream = client.chat.completions.create(
            model="default_model",
            messages=[{"role": "user", "content": "Go on."}],
            max_tokens=200,
            temperature=0,
            stream=True,
        )
        next(iter(stream))  # it is running
        with pytest.raises(openai.InternalServerError) as e:
            chat(client, [{"role": "user", "content": "Me too."}], max_tokens=4)
        assert e.value.status_code == 503
        assert "Busy" in str(e.value) and "--max-queued" in str(e.value)
        stream.close()
    finally:
        server.admission.max_queued = 8
    deadline = time.monotonic() + 20
    while server.admission.count:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert chat(client, [{"role": "user", "content": "Hello."}], max_tokens=4)


def test_kv_share_counts_buffers_in_mlx_lm_steps():
    kv = KVShare(kv_bytes=4096 * 100, context_length=4096)
    assert kv.bytes_for(1) == kv.bytes_for(256) == 256 * 100
    assert kv.bytes_for(257) == 512 * 100 and kv.bytes_for(4096) == kv.kv_bytes


def kv_cache(tokens: int):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 2, tokens, 4)), mx.zeros((1, 2, tokens, 4)))
    return [cache]


def test_prompt_cache_moves_a_prefix_and_never_outgrows_the_share():
    kv = KVShare(kv_bytes=1024 * 2 * 2 * 4 * 4, context_length=1024)  # K and V, float32
    cache = BudgetedPromptCache(10, 1 << 40, kv)
    assert cache.max_bytes == kv.kv_bytes  # bounded by the share, whatever was asked
    history = list(range(300))
    entry = kv_cache(300)  # a 512-token buffer
    cache.insert_cache("m", history, entry)
    cache.insert_cache("m", [7] * 40, kv_cache(40))
    # The next turn fits the entry's buffer: it is taken, not copied, and the other
    # entry gives way to the reply's KV cache.
    cache.need_tokens = 320 + 100
    taken, rest = cache.fetch_nearest_cache("m", history + list(range(20)))
    assert taken is entry and len(rest) == 20
    assert len(cache) == 1 and cache.nbytes <= kv.kv_bytes - sum(c.nbytes for c in entry)
    # A reply that needs nearly the whole context, off a 3-token prefix: growing that
    # cache would pass the share (3 + whole steps), so it starts fresh instead.
    cache.insert_cache("m", [1, 2, 3, 4, 5], kv_cache(5))
    cache.need_tokens = 1000
    reused, rest = cache.fetch_nearest_cache("m", [1, 2, 3] + [9] * 900)
    assert reused is None and len(rest) == 903 and cache.nbytes == 0


# -- the command, as a subprocess: state file, memory under concurrent clients ---------

BASELINE = baseline_script("mlx_lm.utils, mlx_lm.server, transformers, mlx_pager.serve.server")
ONE_REPLY = COMMAND
PROMPT = "Experts page in from disk, {0}. " * 6


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_serve_command_stays_in_budget_under_concurrent_clients(tmp_path, isolated_user_dirs):
    path = make_checkpoint(
        tmp_path / "big", "qwen3_moe", hidden_size=512, moe_intermediate_size=512,
        intermediate_size=512, num_experts=32, num_experts_per_tok=4, num_hidden_layers=4,
    )  # fmt: skip
    budget = 100 * MB
    baseline = int(subprocess.check_output([sys.executable, "-c", BASELINE], text=True))
    # The engine alone, one reply of the same shape: what serving must not add to.
    one_reply = subprocess.run(
        [sys.executable, "-c", ONE_REPLY, "generate", "--model", str(path), "--budget", "100MB",
         "--context-length", "512", "-p", PROMPT.format(0), "-m", "12", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    single_peak = int(one_reply.stdout.strip().splitlines()[-1])
    data = isolated_user_dirs / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_pager.cli", "serve", "--model", str(path), "--budget",
         "100MB", "--context-length", "512", "--port", "0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (state := running_server(data)) is None:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        assert state.pid == proc.pid and state.host == "127.0.0.1"
        client = openai.OpenAI(base_url=f"{state.url}/v1", api_key="none", max_retries=0)

        watched, peak, done = psutil.Process(proc.pid), 0, threading.Event()

        def watch():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, watched.memory_info().rss)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()

        def ask(i: int) -> str:
            messages = [{"role": "user", "content": PROMPT.format(i)}]
            return chat(client, messages, max_tokens=12, stream=i % 2 == 0)

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, range(4)))
        stats = json.loads(urllib.request.urlopen(state.url + STATS_PATH).read())
        done.set()
        watcher.join()
        peak = max(peak, peak_rss_of(proc.pid))
        assert all(replies)
        assert stats["misses"] > stats["slots"]  # it really paged
        # Four clients at once stay inside the budget, as one reply does: one runs, the
        # others wait, and the prompt cache stays inside the KV share. 1 MB: VmHWM counts
        # whole pages, and the baseline's imports vary a little from run to run.
        limit = budget + baseline + 1 * MB
        assert single_peak <= limit, dict(single=single_peak, baseline=baseline)
        assert peak <= limit, dict(peak=peak, baseline=baseline, single=single_peak)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read()
    assert running_server(data) is None and not (data / "server.json").exists()


def test_listening_beyond_this_machine_is_said():
    assert exposure_warning("127.0.0.1", 8080) is None
    assert exposure_warning("::1", 8080) is None
    warning = exposure_warning("0.0.0.0", 8080)
    assert "0.0.0.0" in warning and "8080" in warning and "--host 127.0.0.1" in warning


def test_a_busy_port_says_to_pick_another(capsys):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        code = main(["serve", "--port", str(port), "--context-length", "256"])
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert code == 2 and f"127.0.0.1:{port}" in err and "--port" in err


def test_serve_refuses_a_budget_past_the_machine(capsys):
    """The same check as `generate --budget`: nothing is opened for a budget this machine
    cannot hold."""
    assert main(["serve", "--budget", "100TB", "--port", "0"]) == 2
    assert "--budget 100TB" in capsys.readouterr().err
