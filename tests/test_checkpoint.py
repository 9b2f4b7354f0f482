"""jax_sparseconv.checkpoint: exact round trips, the save interval, fallback past an
unreadable checkpoint, the previous checkpoint kept by a process killed while saving, and a
clear error for another model's checkpoint; and jsc.grown_capacity and jsc.tensor.overflowed,
which decide the rerun of an overflowing batch."""

import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_sparseconv as jsc

pytest.importorskip("orbax.checkpoint")
from jax_sparseconv.checkpoint import IncompatibleCheckpointError, TrainingCheckpoints  # noqa: E402


def _state(seed: int, width: int = 3):
    rng = np.random.default_rng(seed)
    params = {"kernel": jnp.asarray(rng.normal(size=(2, width)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(width,)), jnp.bfloat16)}
    opt_state = optax.adam(1e-2).init(params)
    return {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(jax.random.key(seed)),
            "data_position": seed * 10}


def _assert_bitwise(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_restores_the_newest_state_bit_for_bit(tmp_path):
    with TrainingCheckpoints(tmp_path, save_every=2) as checkpoints:
        state, step = checkpoints.restore(_state(0))
        assert step == 0
        saved = [checkpoints.save(step, _state(step)) for step in range(1, 6)]
        assert saved == [False, True, False, True, False]
        assert checkpoints.steps() == [2, 4]
    with TrainingCheckpoints(tmp_path, save_every=2) as checkpoints:
        restored, step = checkpoints.restore(_state(0))
    assert step == 4
    _assert_bitwise(restored, _state(4))


def test_an_unreadable_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    with TrainingCheckpoints(tmp_path, save_every=1, keep=3) as checkpoints:
        for step in (1, 2, 3):
            checkpoints.save(step, _state(step))
    shutil.rmtree(tmp_path / "3" / "state")  # as if its files were lost
    with TrainingCheckpoints(tmp_path, save_every=1, keep=3) as checkpoints:
        restored, step = checkpoints.restore(_state(0))
        assert step == 2
        assert "checkpoint of step 3" in capsys.readouterr().err
        assert checkpoints.save(3, _state(30))  # step 3 can be saved again
        _assert_bitwise(checkpoints.restore(_state(0))[0], _state(30))
    _assert_bitwise(restored, _state(2))
    assert (tmp_path / "unreadable-3").is_dir()  # kept for inspection
    shutil.rmtree(tmp_path / "3" / "state")  # the same step unreadable again
    with TrainingCheckpoints(tmp_path, save_every=1, keep=3) as checkpoints:
        assert checkpoints.restore(_state(0))[1] == 2
    assert (tmp_path / "unreadable-3-1").is_dir()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    with TrainingCheckpoints(tmp_path, save_every=1) as checkpoints:
        checkpoints.save(1, _state(1))
    shutil.rmtree(tmp_path / "1" / "state")
    with TrainingCheckpoints(tmp_path, save_every=1) as checkpoints, pytest.raises(RuntimeError, match="none of"):
        checkpoints.restore(_state(0))


def test_another_models_checkpoint_names_what_differs(tmp_path):
    with TrainingCheckpoints(tmp_path, save_every=1) as checkpoints:
        checkpoints.save(1, _state(1, width=3))
    other = _state(0, width=4)
    other["params"]["bias"] = other["params"]["bias"].astype(jnp.float32)
    with TrainingCheckpoints(tmp_path, save_every=1) as checkpoints:
        with pytest.raises(IncompatibleCheckpointError) as error:
            checkpoints.restore(other)
    message = str(error.value)
    assert "['params']['kernel']: checkpoint shape (2, 3) float32, this state (2, 4) float32" in message
    assert "['params']['bias']: checkpoint shape (3,) bfloat16, this state (4,) float32" in message
    with TrainingCheckpoints(tmp_path, save_every=1) as checkpoints:
        with pytest.raises(IncompatibleCheckpointError, match=r"\['extra'\]: in this state, not in the checkpoint"):
            checkpoints.restore({**_state(1), "extra": np.zeros(2)})


@pytest.mark.parametrize("capacity, record, expected", [
    (1024, [0, 0], 1280),                      # nothing recorded: the next bucket
    (1024, [3000, 1024], 3072),                # the input held 3000 rows
    (1024, [[0, 0], [900, 512]], 2048),        # a layer at half the input's capacity needed 900
    (4096, [4100, 4096], 5120),
])
def test_grown_capacity_fits_what_overflowed(capacity, record, expected):
    grown = jsc.grown_capacity(capacity, np.asarray(record))
    assert grown == expected and grown == jsc.capacity_bucket(grown)


@pytest.mark.parametrize("record, expected", [
    ([0, 0], False), ([[0, 0], [0, 0]], False), ([[0, 0], [900, 512]], True), ([3000, 1024], True)])
def test_overflowed_reads_one_record_or_a_stack(record, expected):
    assert jsc.tensor.overflowed(np.asarray(record)) is expected


_SAVE_THEN_SAVE_BIG = """
import sys
import jax.numpy as jnp
from jax_sparseconv.checkpoint import TrainingCheckpoints
with TrainingCheckpoints(sys.argv[1], save_every=1) as checkpoints:
    checkpoints.save(1, {"w": jnp.full((4,), 1.0)})
    print("saved 1", flush=True)
    big = {"w": jnp.full((4,), 2.0), **{f"b{i}": jnp.arange(2**22, dtype=jnp.float32) + i for i in range(48)}}
    while True:  # saves until killed, so the kill lands in a save
        checkpoints.save(2, big)
"""


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL during orbax's write of step 2 (768 MiB, while its temporary directory
    exists): the directory still restores, to step 1, bitwise."""
    process = subprocess.Popen([sys.executable, "-c", _SAVE_THEN_SAVE_BIG, str(tmp_path)], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert process.stdout.readline() == "saved 1\n"
        deadline = time.monotonic() + 120
        while not any("tmp" in p.name for p in tmp_path.iterdir()):  # orbax writes step 2 under a temporary name
            assert process.poll() is None and time.monotonic() < deadline, "the save of step 2 did not start"
            time.sleep(0.005)
        time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    assert not (tmp_path / "2").exists(), "the kill came after step 2's save finished: make the state larger"
    with TrainingCheckpoints(tmp_path, save_every=1) as checkpoints:
        restored, step = checkpoints.restore({"w": jnp.zeros((4,))})
        assert step == 1
        _assert_bitwise(restored, {"w": jnp.full((4,), 1.0)})
        assert checkpoints.save(2, {"w": jnp.full((4,), 3.0)})  # and step 2 saves again over the remains
        _assert_bitwise(checkpoints.restore({"w": jnp.zeros((4,))})[0], {"w": jnp.full((4,), 3.0)})
