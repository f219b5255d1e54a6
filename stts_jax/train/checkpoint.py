"""One Orbax CheckpointManager per run with three items per step:

  state      model params, optimizer state and counters (`nnx.State` of a TrainState, as a pure
             dict), written cooperatively by all processes, restored into abstract targets that
             carry the current mesh's NamedShardings (a different mesh or process count is fine).
  data_iter  the data iterator state, one JSON file per process (`process_{i}-of-{n}.json`), from
             `get_state()` (Grain DatasetIterator: dict, DataLoaderIterator: bytes, or any
             iterator with the same two methods).
  config     the run's config as JSON.

Saves are asynchronous (`enable_async_checkpointing`): the arrays are copied off device and
written in the background; `wait()` blocks until the last save is durable. If the data iterator
file for the current process count is missing (restart with a different number of processes),
the model state is restored, the data iterator keeps its fresh position, and a warning says so.
"""

import dataclasses
import json
import logging
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

log = logging.getLogger(__name__)


def _iter_filename(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataIterHandler(ocp.CheckpointHandler):
  """Per-process data iterator state (Orbax handler; sync, the state is tiny)."""

  def save(self, directory: epath.Path, args: "DataIterSave"):
    state = args.item.get_state()
    if isinstance(state, bytes):
      payload = {"format": "bytes", "state": state.decode("utf-8")}
    else:
      payload = {"format": "json", "state": state}
    _iter_filename(directory).write_text(json.dumps(payload, indent=1))

  def restore(self, directory: epath.Path, args: "DataIterRestore") -> bool:
    """Sets the iterator's state; returns False (and warns) if this process has no file."""
    filename = _iter_filename(directory)
    if not filename.exists():
      found = sorted(p.name for p in directory.glob("process_*.json"))
      log.warning("checkpoint %s has no data iterator state for %s (found %s): the model state is "
                  "restored but the data iterator starts from its initial position",
                  directory, filename.name, found)
      return False
    payload = json.loads(filename.read_text())
    state = payload["state"]
    args.item.set_state(state.encode("utf-8") if payload["format"] == "bytes" else state)
    if hasattr(args.item, "start_prefetch"):
      args.item.start_prefetch()
    return True

  def metadata(self, directory: epath.Path) -> Optional[Any]:
    del directory
    return None

  def finalize(self, directory: epath.Path):
    del directory

  def close(self):
    pass


@ocp.args.register_with_handler(DataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """The run's CheckpointManager (items `state`, `data_iter`, `config`)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data_iter", "config"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: nnx.State, data_iter: Any, config: dict) -> bool:
    """Starts saving step `step` (returns at once when async). Always saves (force)."""
    return self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
        data_iter=DataIterSave(data_iter),
        config=ocp.args.JsonSave(config)))

  def restore(self, step: int, abstract_state: nnx.State, data_iter: Any) -> tuple[nnx.State, dict]:
    """Restores `state` into the layout of `abstract_state` (ShapeDtypeStructs with shardings)
    and `data_iter` in place; returns (state, saved config)."""
    target = nnx.to_pure_dict(abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data_iter=DataIterRestore(data_iter),
        config=ocp.args.JsonRestore()))
    state = jax.tree.map(lambda x: x, abstract_state)   # fresh container of the same structure
    nnx.replace_by_pure_dict(state, restored["state"])
    return state, restored["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
