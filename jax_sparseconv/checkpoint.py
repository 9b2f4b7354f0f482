"""Training checkpoints that resume exactly, on orbax-checkpoint (``pip install orbax-checkpoint``).

    checkpoints = TrainingCheckpoints(directory, save_every=100)
    state, start = checkpoints.restore(initial_state)   # (initial_state, 0) when none is saved
    for step in range(start, steps):
        state = train_step(state, ...)
        checkpoints.save(step + 1, state)                # every save_every steps
    checkpoints.close()

A state is a pytree of arrays and scalars: parameters, batch statistics, optimizer state,
the RNG key's data (``jax.random.key_data``) and the data position, everything the next
step depends on. Restored, it holds the saved values bit for bit, placed like the arrays of
``initial_state`` (so sharded and multi-process states restore as they were saved: every
process calls ``save`` and ``restore``).

Saving is atomic (orbax writes a temporary folder and renames it when it is complete): a run
killed while saving leaves the previous checkpoint usable. ``restore`` tries the newest
checkpoint first and falls back to the one before when a checkpoint cannot be read, saying
so on stderr. A checkpoint whose arrays differ from ``initial_state`` (another model or
optimizer) raises ``IncompatibleCheckpointError`` (a ValueError) naming each array that differs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["TrainingCheckpoints", "IncompatibleCheckpointError"]


class IncompatibleCheckpointError(ValueError):
    """A checkpoint's arrays differ in path, shape or dtype from the state restored into."""


def _signature(state) -> dict[str, list]:
    """``{path: [shape, dtype]}`` of every leaf of ``state``."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): [list(np.shape(leaf)), _dtype(leaf).name] for path, leaf in leaves}


def _dtype(leaf) -> np.dtype:
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype  # Python scalars


def _differences(saved: dict[str, list], expected: dict[str, list]) -> list[str]:
    lines = [f"{path}: in the checkpoint, not in this state" for path in saved if path not in expected]
    lines += [f"{path}: in this state, not in the checkpoint" for path in expected if path not in saved]
    lines += [f"{path}: checkpoint shape {tuple(saved[path][0])} {saved[path][1]}, "
              f"this state {tuple(expected[path][0])} {expected[path][1]}"
              for path in expected if path in saved and saved[path] != expected[path]]
    return lines


def _abstract(leaf):
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return np.asarray(leaf)  # numpy arrays and Python scalars restore as numpy arrays


class TrainingCheckpoints:
    """Checkpoints of a training state in ``directory``, one every ``save_every`` steps, the
    newest ``keep`` kept (spconv has none: PyTorch users call ``torch.save`` themselves)."""

    def __init__(self, directory: str | Path, save_every: int, keep: int = 2):
        import orbax.checkpoint as ocp  # optional dependency: only checkpointing needs it

        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        # Synchronous saves: a save has finished (and its step is restorable) when save returns.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """The steps with a complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> bool:
        """Saves ``state`` as the state after ``step`` steps when ``step`` is a multiple of
        ``save_every``; True when it saved."""
        if step % self.save_every:
            return False
        ocp = self._ocp
        return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                signature=ocp.args.JsonSave(_signature(state))))

    def restore(self, initial_state: Any) -> tuple[Any, int]:
        """``(state, step)`` of the newest readable checkpoint; ``(initial_state, 0)`` when
        the directory holds none. Raises ``IncompatibleCheckpointError`` when the newest
        readable one does not fit ``initial_state``, RuntimeError when none is readable."""
        ocp = self._ocp
        expected = _signature(initial_state)
        abstract = jax.tree_util.tree_map(_abstract, initial_state)
        steps = self.steps()
        for step in reversed(steps):
            try:
                saved = self._manager.restore(step, args=ocp.args.Composite(signature=ocp.args.JsonRestore()))
                differences = _differences(saved["signature"], expected)
                if differences:
                    raise IncompatibleCheckpointError(
                        f"checkpoint {self.directory / str(step)} does not fit this model and optimizer:\n  "
                        + "\n  ".join(differences))
                restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            except IncompatibleCheckpointError:
                raise
            except Exception as error:  # noqa: BLE001  (any unreadable file: fall back, said)
                print(f"jax_sparseconv: checkpoint of step {step} in {self.directory} cannot be read "
                      f"({type(error).__name__}: {str(error)[:300]}); trying the one before",
                      file=sys.stderr, flush=True)
                continue
            self._set_aside([s for s in steps if s > step])
            return restored["state"], step
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} can be read (see above)")
        return initial_state, 0

    def _set_aside(self, unreadable: list[int]) -> None:
        """Renames unreadable checkpoints to ``unreadable-<step>`` (kept for inspection), so
        that the resumed run can save those steps again."""
        if not unreadable:
            return
        if jax.process_index() == 0:
            for step in unreadable:
                target, n = self.directory / f"unreadable-{step}", 1
                while target.exists():  # set aside before, and saved again since
                    target, n = self.directory / f"unreadable-{step}-{n}", n + 1
                (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jax_sparseconv checkpoints set aside")
        self._manager.reload()

    def close(self) -> None:
        """Waits for the checkpointer and releases it."""
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
