"""SIGKILL `pock sensitivity` at random moments, then run it again: what is on disk always loads or is ignored, and the
resumed table equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pock_hf.cli import main, partial_path
from pock_hf.planning.table import SensitivityTable

from .tiny import save_tiny_checkpoint

ROWS = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."} for i in range(12)]
# 4 layers x 2 modules x 2 ratios = 16 units, each saved to the partial file as soon as it is measured
MEASURE = ["--granularity", "module", "--modules", "mlp.up_proj,mlp.down_proj", "--ratios", "0.5,1"]
SETUP = ["--eval-rows", "4", "--steps", "2", "--batch-size", "4", "--no-costs", *MEASURE]
UNITS = 16


@pytest.fixture(scope="module")
def one_thread():
    """Every run (killed child, resumed run, reference) uses one thread: the same float results, and tiny models run
    fastest that way on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """A tiny Llama checkpoint (safetensors), a data file, and the table of an uninterrupted run."""
    root = tmp_path_factory.mktemp("kill")
    model = save_tiny_checkpoint(root / "tiny-llama")
    data = root / "rows.json"
    data.write_text(json.dumps(ROWS))
    args = ["sensitivity", "--model", str(model), "--data", str(data), *SETUP]
    reference = root / "reference" / "table.json"
    assert main([*args, "--out", str(reference)]) == 0
    return args, SensitivityTable.from_json(reference)


def deterministic(table: SensitivityTable) -> dict:
    """Everything but the timing of the run that wrote it."""
    data = table.to_dict()
    data["settings"] = {key: value for key, value in data["settings"].items() if key != "seconds"}
    return data


def read_if_there(path: Path) -> SensitivityTable | None:
    """The table at `path`, or None if there is none; a file that is there must load (writes are atomic)."""
    try:
        return SensitivityTable.from_json(path)
    except ValueError as error:
        if "does not exist" in str(error):  # not written yet, or removed at the end of the run
            return None
        raise


@pytest.mark.parametrize(("seed", "when"), [(0, "units"), (1, "units"), (2, "start-up")])
def test_killed_measurement_resumes_to_the_uninterrupted_table(setup, tmp_path, seed, when):
    args, reference = setup
    out = tmp_path / "sens" / "table.json"
    partial = partial_path(out)
    rng = random.Random(seed)
    # "start-up": a random moment within the first 3 s (imports, loading, the baseline), or as soon as the first
    # partial table appears if that comes sooner; "units": a random moment inside the unit after the first k units
    # are on disk, k random (0: just after the baseline)
    kill_after_units = rng.randrange(UNITS) if when == "units" else -1
    startup_delay = rng.uniform(0.0, 3.0)
    child = subprocess.Popen(
        [sys.executable, "-m", "pock_hf.cli", *args, "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    try:
        while child.poll() is None:
            seen = read_if_there(partial)
            if seen is not None:
                assert seen.rows == reference.rows[: len(seen.rows)]  # a prefix of the uninterrupted run
            if kill_after_units < 0 and (time.monotonic() - started > startup_delay or seen is not None):
                break
            if seen is not None and kill_after_units >= 0 and len(seen.rows) >= kill_after_units:
                time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the next unit or its write
                break
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before the kill, so nothing was interrupted"

    # What the killed run left: the finished table only if it got that far, a partial table that loads, and at most
    # hidden temporary files that nothing reads.
    finished = read_if_there(out)
    if finished is not None:
        assert deterministic(finished) == deterministic(reference)
    left = read_if_there(partial)
    if left is not None:
        assert left.rows == reference.rows[: len(left.rows)]
    if when == "units":  # the kill landed after the k-th unit was saved: those units are on disk, in some table
        assert finished is not None or (left is not None and len(left.rows) >= kill_after_units)
    visible = {p.name for p in out.parent.iterdir() if not p.name.startswith(".")} if out.parent.exists() else set()
    assert visible <= {"table.json", "table.csv", "table.png", "table.partial.json"}
    assert all(p.suffix == ".tmp" for p in out.parent.glob(".*")) if out.parent.exists() else True

    assert main([*args, "--out", str(out)]) == 0
    assert deterministic(SensitivityTable.from_json(out)) == deterministic(reference)
    assert not partial.exists()


def test_partial_from_other_settings_is_refused_naming_the_difference(setup, tmp_path, capsys):
    args, reference = setup
    out = tmp_path / "table.json"
    reference.to_json(partial_path(out))
    assert main([*args, "--steps", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(partial_path(out)) in err and "steps=2 (now 3)" in err and "Delete it to start over" in err
