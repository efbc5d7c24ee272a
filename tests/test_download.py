"""Downloads against a local Hub (tests/hub_server.py): plan, cache layout, cancel and
resume, errors that say what to do, verdicts, and the two commands."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hub_server import HubServer, free_port_endpoint
from safetensors.numpy import save_file

import mlx_pager.hub.fetch as dl
from mlx_pager.cli import main
from mlx_pager.engine import default_model
from mlx_pager.estimate import (
    engine_float_itemsize,
    hit_rate_estimate,
    local_sizes,
    local_verdict,
    verdict,
)
from mlx_pager.hub.cache import ALLOW_PATTERNS, cached_models
from mlx_pager.hub.catalogue import float_share, load_catalogue
from mlx_pager.hub.errors import (
    DownloadCancelled,
    HubUnreachable,
    ModelGated,
    ModelNotFound,
    NotEnoughDisk,
)
from mlx_pager.hub.fetch import download
from mlx_pager.hub.plan import plan_download
from mlx_pager.hub.resolve import resolve_model
from mlx_pager.speed import MAC_CONSTANTS, MachineConstants

GB = 10**9
LAYERS, EXPERTS, TOP_K = 2, 8, 2


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """A 4 MiB MoE-shaped checkpoint (random bytes: a resumed file must match exactly)."""
    folder = tmp_path_factory.mktemp("moe") / "model"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((1000, 64), dtype=np.float32)}
    for i in range(LAYERS):
        w = rng.integers(0, 2**32, (EXPERTS, 128, 512), dtype=np.uint32)  # 2 MiB
        tensors[f"model.layers.{i}.mlp.switch_mlp.gate_proj.weight"] = w
        tensors[f"model.layers.{i}.mlp.gate.weight"] = np.ones((EXPERTS, 64), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "model_type": "qwen3_moe",
        "num_hidden_layers": LAYERS,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "README.md").write_text("not in mlx-lm's allow patterns")
    (folder / "pytorch_model.bin").write_bytes(b"neither")
    return folder


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_allow_patterns_are_mlx_lms():
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    assert ALLOW_PATTERNS == [p for p in DEFAULT_ALLOW_PATTERNS if p != "*.py"]


def test_plan_sizes_match_the_files(hub_server, moe_folder, hf_cache):
    commit = hub_server.add_repo("org/moe", moe_folder)
    plan = plan_download("org/moe", endpoint=hub_server.endpoint, free_space=lambda p: 7 * GB)
    assert plan.commit == commit
    assert {f.name for f in plan.files} == {"config.json", "model.safetensors", "tokenizer.json"}
    assert plan.total_bytes == sum((moe_folder / f.name).stat().st_size for f in plan.files)
    assert plan.cached_bytes == 0 and plan.remaining_bytes == plan.total_bytes
    assert plan.free_bytes == 7 * GB and plan.disk_problem == ""
    s = plan.sizes
    assert s is not None, plan.sizes_error
    assert s.expert_bytes == LAYERS * EXPERTS * 128 * 512 * 4
    assert s.dense_bytes == 1000 * 64 * 4 + LAYERS * EXPERTS * 64 * 4
    assert (s.moe_layers, s.experts, s.top_k) == (LAYERS, EXPERTS, TOP_K)
    assert s.one_expert_bytes == 128 * 512 * 4
    assert s.kv_bytes_per_token == LAYERS * 2 * 2 * 16 * 2
    # Headers only: no GET of the weights without a Range.
    gets = hub_server.seen("GET", "model.safetensors")
    assert gets and all("Range" in r.headers or "range" in r.headers for r in gets)
    assert local_sizes(moe_folder) == s


def test_download_lands_in_the_hf_cache_layout(hub_server, moe_folder, hf_cache):
    commit = hub_server.add_repo("org/moe", moe_folder)
    seen = []
    path = download("org/moe", endpoint=hub_server.endpoint, progress=lambda *a: seen.append(a))
    repo = hf_cache / "models--org--moe"
    assert path == repo / "snapshots" / commit
    assert (repo / "refs" / "main").read_text() == commit
    weights = path / "model.safetensors"
    assert weights.is_symlink()
    blob = weights.resolve()
    assert blob.parent == repo / "blobs" and blob.name == sha(moe_folder / "model.safetensors")
    assert sha(weights) == sha(moe_folder / "model.safetensors")
    assert not (path / "README.md").exists() and not (path / "pytorch_model.bin").exists()
    assert not list((repo / "blobs").glob("*.incomplete"))
    done, total, _ = seen[-1]
    assert done == total == sum(f.stat().st_size for f in path.iterdir())
    assert resolve_model("org/moe") == path
    # Again: nothing left to fetch, no file body requested.
    before = len(hub_server.seen("GET", "/resolve/"))
    assert download("org/moe", endpoint=hub_server.endpoint) == path
    assert len(hub_server.seen("GET", "/resolve/")) == before


def test_cancel_keeps_a_partial_that_resumes_with_range(hub_server, moe_folder, hf_cache):
    hub_server.add_repo("org/moe", moe_folder)
    hub_server.throttle = 2_000_000  # 4 MiB take about 2 s
    cancel = threading.Event()

    def progress(done, total, file):
        if file == "model.safetensors" and done > 600_000:
            cancel.set()

    with pytest.raises(DownloadCancelled, match="resumes"):
        download("org/moe", endpoint=hub_server.endpoint, progress=progress, cancel=cancel)
    blobs = hf_cache / "models--org--moe" / "blobs"
    (partial,) = blobs.glob("*.incomplete")
    kept = partial.stat().st_size
    size = (moe_folder / "model.safetensors").stat().st_size
    assert 0 < kept < size
    assert (
        plan_download("org/moe", endpoint=hub_server.endpoint, read_sizes=False).cached_bytes
        >= kept
    )
    assert resolve_model(str(moe_folder))  # unrelated folder still fine
    with pytest.raises(FileNotFoundError, match="mlx-pager download org/moe"):
        resolve_model("org/moe")

    hub_server.throttle = None
    path = download("org/moe", endpoint=hub_server.endpoint)
    ranged = [r for r in hub_server.seen("GET", "model.safetensors") if "Range" in r.headers]
    assert f"bytes={kept}-" in [r.headers["Range"] for r in ranged]
    assert sha(path / "model.safetensors") == sha(moe_folder / "model.safetensors")
    assert not list(blobs.glob("*.incomplete"))


def test_cancel_while_the_connection_stalls_is_a_cancel(hub_server, moe_folder, hf_cache):
    """Cancel pressed while a read waits on a dying connection: "cancelled", not "failed"."""
    hub_server.add_repo("org/moe", moe_folder)
    hub_server.throttle = 100_000  # the next 256 KB chunk takes seconds to arrive
    cancel = threading.Event()
    timers = []

    def cancel_then_drop() -> None:
        cancel.set()
        hub_server.close()

    def progress(done, total, file):
        if file == "model.safetensors" and done > 0 and not timers:
            timers.append(threading.Timer(0.3, cancel_then_drop))
            timers[0].start()

    with pytest.raises(DownloadCancelled, match="resumes"):
        download("org/moe", endpoint=hub_server.endpoint, progress=progress, cancel=cancel)
    assert list((hf_cache / "models--org--moe" / "blobs").glob("*.incomplete"))


def test_dropped_connection_resumes_within_the_call(hub_server, moe_folder, hf_cache):
    hub_server.add_repo("org/moe", moe_folder)
    hub_server.fail_after = 1_000_000
    path = download("org/moe", endpoint=hub_server.endpoint)
    assert any(
        r.headers.get("Range", "").startswith("bytes=")
        for r in hub_server.seen("GET", "model.safetensors")
    )
    assert sha(path / "model.safetensors") == sha(moe_folder / "model.safetensors")


def test_not_enough_disk_is_refused_before_starting(hub_server, moe_folder, hf_cache):
    hub_server.add_repo("org/moe", moe_folder)
    with pytest.raises(NotEnoughDisk, match="free some space.*HF_HUB_CACHE"):
        download("org/moe", endpoint=hub_server.endpoint, free_space=lambda p: 1000)
    assert not hub_server.seen("GET", "/resolve/")


def test_errors_say_what_to_do(hub_server, moe_folder, hf_cache):
    hub_server.add_repo("org/moe", moe_folder)
    with pytest.raises(ModelNotFound, match="No model org/typo on the Hub: check the spelling"):
        plan_download("org/typo", endpoint=hub_server.endpoint)
    with pytest.raises(ModelNotFound, match="no revision 'nope'"):
        download("org/moe", revision="nope", endpoint=hub_server.endpoint)
    hub_server.gated.add("org/moe")
    with pytest.raises(ModelGated, match="accept its licence.*log in"):
        download("org/moe", endpoint=hub_server.endpoint)
    down = free_port_endpoint()
    with pytest.raises(HubUnreachable) as e:
        download("org/moe", endpoint=down)
    # Planning failed: nothing was fetched, so no resume is promised.
    assert str(e.value) == (
        f"Cannot reach {down} to look up org/moe: check your connection and try again; "
        "nothing was downloaded."
    )
    blobs = hf_cache / "models--org--moe" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc.incomplete").write_bytes(b"x" * 1000)  # left by an earlier download
    with pytest.raises(HubUnreachable) as e:
        plan_download("org/moe", endpoint=down)
    assert str(e.value) == (
        f"Cannot reach {down} to look up org/moe: check your connection and try again; "
        "the 1.0 KB already downloaded is kept and resumes."
    )


def test_hub_gone_mid_download_keeps_the_partial_for_later(
    hub_server, moe_folder, hf_cache, monkeypatch
):
    monkeypatch.setattr("mlx_pager.hub.fetch.RETRY_WAIT_S", 0.01)
    hub_server.add_repo("org/moe", moe_folder)
    hub_server.throttle = 2_000_000

    def progress(done, total, file):
        if file == "model.safetensors" and done > 600_000 and hub_server._httpd:
            hub_server.close()

    down = hub_server.endpoint
    with pytest.raises(HubUnreachable, match=f"Cannot reach {down}.*resumes next time"):
        download("org/moe", endpoint=down, progress=progress)
    (partial,) = (hf_cache / "models--org--moe" / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    assert kept > 0

    back = HubServer().start()  # the Hub again, elsewhere
    try:
        back.add_repo("org/moe", moe_folder)
        path = download("org/moe", endpoint=back.endpoint)
        assert [r.headers.get("Range") for r in back.seen("GET", "model.safetensors")][-1] == (
            f"bytes={kept}-"
        )
        assert sha(path / "model.safetensors") == sha(moe_folder / "model.safetensors")
    finally:
        back.close()


def fill_disk_after(monkeypatch, limit: int) -> dict[str, int]:
    """Writes to partial downloads raise ENOSPC once ``limit`` bytes went to them; returns
    the bytes written per partial file. ``monkeypatch.delattr(dl, "open")`` frees space."""
    import builtins

    written: dict[str, int] = {}

    class FillingFile:
        def __init__(self, f, path: str) -> None:
            self.f, self.path = f, path
            written.setdefault(path, 0)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def write(self, chunk: bytes) -> int:
            if sum(written.values()) + len(chunk) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            written[self.path] += len(chunk)
            return self.f.write(chunk)

    def filling_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FillingFile(f, str(path)) if str(path).endswith(".incomplete") else f

    monkeypatch.setattr(dl, "open", filling_open, raising=False)
    return written


def test_disk_full_mid_download_keeps_a_resumable_partial(
    hub_server, moe_folder, hf_cache, monkeypatch
):
    """ENOSPC while writing: a message that says what to do, and what was written stays."""
    hub_server.add_repo("org/moe", moe_folder)
    written = fill_disk_after(monkeypatch, 700_000)
    with pytest.raises(NotEnoughDisk) as e:
        download("org/moe", endpoint=hub_server.endpoint)
    assert str(e.value) == (
        "The disk is full: free some space (or set HF_HUB_CACHE to a larger disk); the "
        "partial download is kept and `mlx-pager download org/moe` resumes it."
    )
    (partial,) = (hf_cache / "models--org--moe" / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept == written[str(partial)] < (moe_folder / "model.safetensors").stat().st_size

    monkeypatch.delattr(dl, "open")  # space freed: downloading resumes
    path = download("org/moe", endpoint=hub_server.endpoint)
    ranged = [r.headers.get("Range") for r in hub_server.seen("GET", "model.safetensors")]
    assert f"bytes={kept}-" in ranged
    assert sha(path / "model.safetensors") == sha(moe_folder / "model.safetensors")


def test_hit_rate_curve():
    assert hit_rate_estimate(0) == 0 and hit_rate_estimate(1) == 1
    points = [hit_rate_estimate(f / 100) for f in range(0, 101)]
    assert points == sorted(points)
    assert hit_rate_estimate(0.05) == pytest.approx(0.5)
    assert 0.85 <= hit_rate_estimate(0.3) <= 0.9
    assert hit_rate_estimate(0.3, experts_per_layer=8) == 0.3  # Mixtral: no locality


def test_catalogue_numbers_hold_together():
    entries = {e.id: e for e in load_catalogue()}
    assert len(entries) >= 6
    for e in entries.values():
        s = e.sizes
        assert s.dense_bytes + s.expert_bytes == s.total_bytes
        assert abs(s.one_expert_bytes * s.num_experts - s.expert_bytes) < s.num_experts
        assert 0 < s.top_k < s.experts and e.source.startswith("estimate")
    qwen = entries["mlx-community/Qwen3-30B-A3B-4bit"].sizes
    assert qwen.one_expert_bytes / 2**20 == pytest.approx(
        2.5, abs=0.05
    )  # docs/field-notes.md table
    assert qwen.expert_bytes / 2**30 == pytest.approx(15.2, abs=0.05)


# The constants the speed estimate used before it had a machine model: 1 GB/s expert
# reads, 100 GB/s memory, 1 ms per MoE layer, memory-bound.
OLD = MachineConstants(disk_bytes_per_s=1e9, memory_bytes_per_s=100e9, compute_s_per_byte=0.0,
                       host_s_per_layer=1e-3, overlap=0.0, source="test", basis="test")  # fmt: skip


def test_verdicts_for_a_few_budgets():
    qwen = next(e for e in load_catalogue() if e.id == "mlx-community/Qwen3-30B-A3B-4bit").sizes
    assert verdict(qwen, 24 * GB, 4096).verdict == "fits"
    paged = verdict(qwen, 8 * GB, 4096, machine=OLD)
    assert paged.verdict == "paged" and "tokens/s (test)" in paged.reason
    assert paged.speed_source == "test" and paged.speed_basis == "test"
    # docs/field-notes.md: 16 GB M4, 8 GB budget, 89-92% hits, 6.4 tok/s measured.
    assert 0.85 <= paged.hit_rate <= 0.93
    assert 4 <= paged.tokens_per_second <= 12
    smaller = verdict(qwen, 5 * GB, 4096, machine=OLD)
    assert smaller.tokens_per_second < paged.tokens_per_second
    too = verdict(qwen, 1 * GB, 4096, machine=OLD)
    assert too.verdict == "too_large" and too.tokens_per_second is None
    assert "needs at least" in too.reason
    pending = verdict(qwen, 8 * GB, 4096)  # no constants: no figure, and it says so
    assert pending.tokens_per_second is None and pending.speed_basis == "estimate pending"
    assert "tokens/s" not in pending.reason


def test_speed_estimate_is_sane_for_small_models_and_monotonic():
    """Per-layer overhead (speed.MOE_LAYER_OVERHEAD_S): the embedded model measures 18-124
    tok/s on this project's 2-core CPU; bandwidth alone said about 14,000."""
    sizes = local_sizes(default_model())
    small = verdict(sizes, 100 * 10**6, 4096, machine=OLD)
    assert small.verdict == "paged"
    assert 10 <= small.tokens_per_second <= 300
    no_host = replace(OLD, host_s_per_layer=0)
    assert verdict(sizes, 100 * 10**6, 4096, machine=no_host).tokens_per_second > 1000
    qwen = next(e for e in load_catalogue() if e.id == "mlx-community/Qwen3-30B-A3B-4bit").sizes
    for model in (sizes, qwen):
        budgets = [v.plan.min_budget_bytes for v in [verdict(model, 0, 4096)]]
        top = verdict(model, 10**12, 4096).plan.full_budget_bytes
        budgets += [budgets[0] + (top - budgets[0]) * i // 10 for i in range(1, 11)]
        speeds = [verdict(model, b, 4096, machine=OLD).tokens_per_second for b in budgets]
        assert all(speeds) and speeds == sorted(speeds)  # more memory is never slower
    # More MoE layers of the same shape: slower.
    deeper = replace(qwen, moe_layers=96, expert_bytes=2 * qwen.expert_bytes,
                     expert_float_bytes=2 * qwen.expert_float_bytes,
                     expert_float_values=2 * qwen.expert_float_values)  # fmt: skip
    deeper = verdict(deeper, 10**12, 4096, machine=OLD)
    assert deeper.tokens_per_second < verdict(qwen, 10**12, 4096, machine=OLD).tokens_per_second
    # An M4's table row, the checkpoint's dtype: near the 6.4-7.8 tok/s measured on a 16 GB
    # M4 MacBook Pro at 8 GB (docs/field-notes.md).
    m4 = MAC_CONSTANTS["M4 Air 16GB"].constants()
    mac = verdict(qwen, 8 * GB, 4096, compute_itemsize=None, machine=m4)
    assert 4 <= mac.tokens_per_second <= 8 and mac.speed_basis == "M4 Air table"
    # A slow CPU (compute-bound): the compute term, not the memory's, sets the speed.
    slow = replace(OLD, compute_s_per_byte=1e-9)
    assert verdict(qwen, 8 * GB, 4096, machine=slow).tokens_per_second < 0.5


def test_sizes_are_the_engines_for_bfloat16_and_4bit_checkpoints():
    """Header sizes widened by the loader's dtype rule plan exactly what inspect_model
    plans, whatever the budget."""
    assets = Path(default_model()).parent
    for folder in (assets / "tiny-moe", assets / "tiny-moe-4bit"):
        sizes = local_sizes(folder)
        for budget in (40 * 10**6, 100 * 10**6, 10**9):
            assert verdict(sizes, budget, 4096).plan == local_verdict(folder, budget, 4096).plan
    assert float_share("mlx-community/Qwen3-30B-A3B-4bit") == (0.5 / 4.5, 0.5 / 4.5)
    assert float_share("mlx-community/gpt-oss-20b-MXFP4-Q4") == (0.5 / 4.5, 0.0)
    assert float_share("org/model-bf16") == (1.0, 1.0)
    qwen = next(e for e in load_catalogue() if e.id == "mlx-community/Qwen3-30B-A3B-4bit").sizes
    assert qwen.in_memory(None).expert_bytes == qwen.expert_bytes  # a GPU keeps float16
    wide = qwen.in_memory(4)  # the CPU: scales and biases in float32
    assert wide.expert_bytes == pytest.approx(qwen.expert_bytes * 10 / 9, rel=1e-6)
    assert wide.kv_bytes_per_token == 2 * qwen.kv_bytes_per_token


def test_one_verdict_before_and_after_download_and_in_the_cli(
    hub_server, hf_cache, capsys, fixed_speed_calibration
):
    """The embedded model is bfloat16; the engine computes in float32 on a CPU. The
    Hub's headers, the downloaded copy and `mlx-pager models` must all plan that."""
    hub_server.add_repo("org/embedded", default_model())
    budget, context = 100 * 10**6, 4096
    plan = plan_download("org/embedded", endpoint=hub_server.endpoint)
    here = fixed_speed_calibration  # what `mlx-pager models` finds cached
    before = verdict(plan.sizes, budget, context, machine=here)
    path = download("org/embedded", endpoint=hub_server.endpoint, plan=plan)
    after = local_verdict(path, budget, context, here)
    assert before.plan == after.plan  # resident, KV cache, expert bytes and slots
    assert (before.verdict, before.reason) == (after.verdict, after.reason)
    assert before.tokens_per_second == pytest.approx(after.tokens_per_second)
    if engine_float_itemsize() == 4:  # the CPU backend: the audit's case
        assert after.verdict == "paged"  # at the checkpoint's bfloat16 it would "fit"
        assert verdict(plan.sizes, budget, context, compute_itemsize=None).verdict == "fits"
    assert main(["settings", "set", "budget", "100MB"]) == 0
    assert main(["settings", "set", "context_length", str(context)]) == 0
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    (row,) = [r for r in json.loads(capsys.readouterr().out) if r["cached"]]
    assert (row["id"], row["verdict"], row["reason"]) == ("org/embedded", after.verdict,
                                                           after.reason)  # fmt: skip


def test_download_and_models_commands(hub_server, tiny_model, hf_cache, capsys):
    commit = hub_server.add_repo("org/tiny", tiny_model)
    assert main(["download", "org/tiny", "--endpoint", hub_server.endpoint]) == 0
    out, err = capsys.readouterr()
    snapshot = hf_cache / "models--org--tiny" / "snapshots" / commit
    assert out.strip().splitlines()[-1] == str(snapshot)
    assert "org/tiny @ main" in out and "free disk" in out and "MoE layers" in out
    assert "100%" in err
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    (row,) = [r for r in rows if r["cached"]]
    assert [r["id"] for r in rows if r["embedded"]] == [default_model()]  # always listed
    assert row["id"] == "org/tiny" and row["runnable"] and row["commit"] == commit
    assert row["verdict"] in ("fits", "paged")
    assert main(["models"]) == 0
    assert "org/tiny" in capsys.readouterr().out
    assert main(["download", "org/typo", "--endpoint", hub_server.endpoint]) == 2
    assert "No model org/typo on the Hub" in capsys.readouterr().err


def test_models_command_with_an_empty_cache(capsys):
    assert main(["models"]) == 0
    assert "mlx-pager download ID" in capsys.readouterr().out
    assert main(["models", "--json", "--catalogue"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["verdict"] for r in rows} <= {"fits", "paged", "too_large"} and len(rows) >= 6
    assert cached_models() == []
    assert os.environ["HF_HUB_CACHE"].startswith(str(os.path.dirname(os.environ["HF_HOME"])))


def test_a_hand_written_catalogue_still_lists(tmp_path):
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps({"models": [{"repo_id": "org/m", "size_bytes": 5}]}))
    (entry,) = load_catalogue(path)
    assert (entry.id, entry.name, entry.sizes.total_bytes) == ("org/m", "org/m", 5)
    with pytest.raises(ValueError, match="unknown"):
        verdict(entry.sizes, GB, 4096)


def test_sharded_plan_reads_every_shard_header_and_writes_nothing(
    hub_server, moe_folder, hf_cache, tmp_path
):
    from safetensors.numpy import load_file

    tensors = load_file(str(moe_folder / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for i, part in enumerate((("embed", "layers.0."), ("layers.1.",)), start=1):
        name = f"model-0000{i}-of-00002.safetensors"
        chunk = {k: v for k, v in tensors.items() if any(p in k for p in part)}
        save_file(chunk, str(sharded / name))
        weight_map |= dict.fromkeys(chunk, name)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text((moe_folder / "config.json").read_text())
    hub_server.add_repo("org/sharded", sharded)
    plan = plan_download("org/sharded", endpoint=hub_server.endpoint)
    assert plan.sizes == local_sizes(moe_folder) == local_sizes(sharded)
    assert not hf_cache.exists() or not list(hf_cache.rglob("*.json"))


def test_ctrl_c_keeps_a_resumable_partial(hub_server, moe_folder, hf_cache, capsys, monkeypatch):
    hub_server.add_repo("org/moe", moe_folder)
    hub_server.throttle = 2_000_000

    class Interrupt:
        def __call__(self, done, total, file):
            if file == "model.safetensors" and done > 600_000:
                raise KeyboardInterrupt

    monkeypatch.setattr("mlx_pager.cli.download._Bar", Interrupt)
    assert main(["download", "org/moe", "--endpoint", hub_server.endpoint]) == 130
    assert "run `mlx-pager download org/moe` again to resume" in capsys.readouterr().err
    assert list((hf_cache / "models--org--moe" / "blobs").glob("*.incomplete"))
