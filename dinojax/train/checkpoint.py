"""Training checkpoints: an orbax `CheckpointManager` over three items per step.

    WORKDIR/checkpoints/<step>/state    the train-state pytree (student, teacher, optimizer
                                        state, centers, step, RNG), sharded arrays
    WORKDIR/checkpoints/<step>/data     the data iterator position (JSON; the step, plus the
                                        seed / batch / dataset size it must match)
    WORKDIR/checkpoints/<step>/config   the run's config (JSON)

Saves are asynchronous (the step loop goes on while the arrays are written) and atomic: orbax
writes into a temporary directory and renames it when every process has finished, so a step
directory that exists is complete and a half-written one (a crash mid-save) is never listed or
restored. Restoring takes abstract arrays carrying the *target* shardings, which is what lets a
checkpoint written on one mesh restore onto another (orbax, "Checkpointing PyTrees of Arrays":
https://orbax.readthedocs.io/en/latest/guides/checkpoint/checkpointing_pytrees.html).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["Checkpointer", "abstract_state", "CheckpointError"]

log = logging.getLogger("dinojax.train")


class CheckpointError(RuntimeError):
    pass


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data_sharding(sharding):
    # key_data adds a trailing axis (the key words); it is never sharded.
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, None))
    return sharding


def _to_storable(tree: Any) -> Any:
    """Typed PRNG keys -> their raw uint32 data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_storable(abstract: Any) -> Any:
    def conv(x):
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(
                data.shape, data.dtype, sharding=_key_data_sharding(x.sharding)
            )
        return x

    return jax.tree.map(conv, abstract)


def _from_storable(tree: Any, abstract: Any) -> Any:
    def conv(x, a):
        if _is_key(a):
            return jax.random.wrap_key_data(x, impl=a.dtype._impl)  # noqa: SLF001 - the key impl
        return x

    return jax.tree.map(conv, tree, abstract)


def abstract_state(state: Any, shardings: Any | None = None) -> Any:
    """`jax.ShapeDtypeStruct`s of `state` (arrays or abstract arrays) with `shardings` (default:
    each leaf's own), the restore target for a checkpoint."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


class Checkpointer:
    """Save and restore training checkpoints under `directory` (see the module docstring).

    `save_every`: steps between periodic saves (`save(..., force=True)` saves regardless);
    `keep`: how many of the latest checkpoints stay on disk.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int = 3,
        async_save: bool = True,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Leftovers of a save that crashed half-way are deleted on start, never restored.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "config"), options=options
        )

    # -- queries --------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- save -----------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_every == 0

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any],
        config: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Start saving `state` as checkpoint `step` (asynchronously). Returns whether a save
        started: periodic steps, or any step with `force`; a step already saved is skipped."""
        if not force and not self.should_save(step):
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_storable(state)),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def wait(self) -> None:
        """Block until every started save is on disk (and committed)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restore --------------------------------------------------------------------------------
    def restore(self, step: int | None, target: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """-> (state, data state, config dict) of checkpoint `step` (None: the latest).

        `target`: the state's abstract arrays with the shardings to restore onto (any mesh),
        e.g. `abstract_state(fresh_state)` or `abstract_state(shapes, shardings)`.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})"
            )
        storable = _abstract_storable(target)
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(storable),
                    data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types; name the checkpoint in one line
            raise CheckpointError(
                f"cannot restore checkpoint {step} from {self.directory}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
        state = _from_storable(out["state"], target)
        return state, dict(out["data"]), dict(out["config"])

    def restore_numpy(self, step: int | None, subtree: tuple[str, ...] = ()) -> Any:
        """Checkpoint `step` (or its `subtree`, e.g. ("teacher",)) as host numpy arrays, whatever
        mesh wrote it: for export and inspection on any machine."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        path = self.directory / str(step) / "state"
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}")
        ckptr = ocp.PyTreeCheckpointer()
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)  # a missing step-level metadata file is expected here
        try:
            meta = ckptr.metadata(path)
        finally:
            absl_log.setLevel(level)
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        tree = meta
        for k in subtree:
            if not isinstance(tree, dict) or k not in tree:
                raise CheckpointError(f"checkpoint {step} has no {'/'.join(subtree)} subtree")
            tree = tree[k]
        item = jax.tree.map(lambda m: np.zeros((), np.float32), tree)
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        for k in reversed(subtree):
            item, restore_args = {k: item}, {k: restore_args}
        out = ckptr.restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
        for k in subtree:
            out = out[k]
        return out

    def read_config(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        path = self.directory / str(step) / "config" / "metadata"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {step} in {self.directory} has no config")
        return json.loads(path.read_text())
