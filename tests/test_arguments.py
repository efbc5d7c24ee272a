"""Every flag and setting checked: out of range is a clear error that states the range,
never a silent clamp; a budget past the machine is refused, past its safe share warned."""

from __future__ import annotations

import pickle

import pytest

import mlx_pager.machine as machine
from mlx_pager.cli import main
from mlx_pager.machine import MachineMemory, budget_warnings
from mlx_pager.settings import Settings, load_settings, settings_path

GB = 10**9

# (command line, what the error must say); parsing fails before anything runs.
BAD_FLAGS = [
    (["generate", "-p", "x", "--max-tokens", "-5"], "--max-tokens/-m: must be from 1 to 1048576"),
    (["generate", "-p", "x", "--max-tokens", "0"], "must be from 1 to"),
    (["generate", "-p", "x", "--max-tokens", "lots"], "takes a whole number from 1"),
    (["generate", "-p", "x", "--temp", "-1"], "--temp: must be a number from 0 to 100"),
    (["generate", "-p", "x", "--temp", "nan"], "--temp: must be a number from 0 to 100"),
    (["generate", "-p", "x", "--top-p", "0"], "--top-p: must be a number above 0 up to 1"),
    (["generate", "-p", "x", "--top-p", "1.5"], "above 0 up to 1"),
    (["generate", "-p", "x", "--seed", "-1"], "--seed: must be from 0 to 4294967295"),
    (["generate", "-p", "x", "--budget=-1GB"], "--budget: Cannot read the size"),
    (["generate", "-p", "x", "--budget", "0"], "--budget: must be a size above zero"),
    (["generate", "-p", "x", "--context-length", "5"], "must be from 128 to 1048576"),
    (["generate", "-p", "x", "--policy", "fifo"], "invalid choice: 'fifo'"),
    (["bench", "--max-tokens", "0"], "--max-tokens: must be from 1"),
    (["bench", "--fractions", "0.5,2"], "--fractions: must be a number above 0 up to 1"),
    (["bench", "--read-samples", "0"], "--read-samples: must be from 1 to 100000"),
    (["profile", "--prompts", "p", "--max-tokens", "-1"], "--max-tokens: must be from 1"),
    (["profile", "--prompts", "p", "--decode-tokens", "0"], "--decode-tokens: must be from 1"),
    (["profile", "--prompts", "p", "--budget", "lots"], "--budget: Cannot read the size"),
    (["simulate", "--trace", "t", "--capacity", "inf"], "--capacity: takes a whole number"),
    (["simulate", "--trace", "t", "--capacity", "-2"], "--capacity: takes a whole number"),
    (["simulate", "--trace", "t", "--capacity", "2.5"], "--capacity: takes a whole number"),
]


@pytest.mark.parametrize(("argv", "says"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_out_of_range_flags_are_refused_with_the_range(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


BAD_SETTINGS = [
    ("budget", "0", "budget must be from 1.0 MB to 1000000.00 GB"),
    ("budget", "lots", "Cannot read the size"),
    ("context_length", "64", "between 128 and 1048576"),
    ("prefetch", "maybe", "true or false"),
    ("policy", "fifo", "policy must be one of"),
    ("read_path", "dma", "read_path must be one of"),
]


@pytest.mark.parametrize(("name", "value", "says"), BAD_SETTINGS)
def test_out_of_range_settings_are_refused(name, value, says, capsys):
    assert main(["settings", "set", name, value]) == 2
    assert says in capsys.readouterr().err
    assert not settings_path().exists()


def test_a_bad_value_in_the_settings_file_names_the_file():
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("context_length = [1, 2]\nprefetch = 3\n")
    with pytest.raises(ValueError, match=f"{path} has a bad value.*context_length"):
        load_settings()


def test_simulate_on_a_pickle_never_suggests_unpickling(tmp_path, capsys):
    path = tmp_path / "trace.npz"
    path.write_bytes(pickle.dumps({"expert_ids": [1]}))
    assert main(["simulate", "--trace", str(path), "--capacity", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not a routing trace" in err
    assert "pickle" not in err.replace(str(path), "")


@pytest.fixture
def machine_of_16gb(monkeypatch):
    fake = MachineMemory(16 * GB, 12 * GB)
    monkeypatch.setattr(machine, "machine_memory", lambda ask_gpu=True: fake)
    return fake


def test_budget_warnings_carry_the_numbers(machine_of_16gb):
    assert budget_warnings(10 * GB, machine_of_16gb) == []
    (warning,) = budget_warnings(13 * GB, machine_of_16gb)
    assert "13.00 GB is 81% of this machine's 16.00 GB, above 75% (12.00 GB)" in warning
    (refusal,) = budget_warnings(20 * GB, machine_of_16gb)
    assert "more than this machine's 16.00 GB" in refusal and "at most 12.00 GB" in refusal


def test_settings_set_budget_warns_then_refuses(machine_of_16gb, capsys):
    assert main(["settings", "set", "budget", "13GB"]) == 0
    assert "warning: budget 13GB: 13.00 GB is 81%" in capsys.readouterr().err
    assert load_settings().budget == "13GB"
    assert main(["settings", "set", "budget", "20GB"]) == 2
    assert "more than this machine's 16.00 GB" in capsys.readouterr().err
    assert load_settings().budget == "13GB"  # the refused value was not saved


def test_generate_budget_past_the_machine_is_refused(machine_of_16gb, capsys):
    assert main(["generate", "-p", "x", "--budget", "20GB"]) == 2
    assert "--budget 20GB: 20.00 GB is more than this machine's 16.00 GB" in capsys.readouterr().err


def test_engine_refuses_max_tokens_below_one():
    from mlx_pager.engine import Engine

    engine = Engine.open()
    try:
        with pytest.raises(ValueError, match="max_tokens must be a whole number from 1"):
            next(engine.generate("hi", max_tokens=-5))
    finally:
        engine.close()


def test_settings_default_is_valid():
    Settings().validate()
