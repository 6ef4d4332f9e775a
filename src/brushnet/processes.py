"""Which process of a multi-process launch (`accelerate launch`, `torchrun`) this is, and its share
of a list of work: `brushnet bench` and folder runs of `brushnet inpaint` split their items so that
every item is done exactly once, by the process at its index modulo the number of processes."""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class ProcessInfo:
    """This process's place in a multi-process run."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None
    state: object = None  # accelerate's PartialState, when available

    def wait_for_everyone(self) -> None:
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()


def process_info() -> ProcessInfo:
    """Rank, world size and device from accelerate's PartialState; one process without a launcher."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from accelerate import PartialState
    except ImportError:
        if launched > 1:
            logger.warning("WORLD_SIZE > 1 but accelerate is not installed: every process does all the work.")
        return ProcessInfo()
    from accelerate.utils import parse_flag_from_env

    # Accelerator reads ACCELERATE_USE_CPU itself; PartialState must be told (CPU processes join over gloo).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if launched > 1 and state.num_processes == 1:
        # Each process would do all the work, and all would write the same files.
        raise ValueError(f"Launched as {launched} processes, but accelerate found no device to run them together; "
                         "on CPUs set ACCELERATE_USE_CPU=1 (or use accelerate launch --cpu).")
    return ProcessInfo(state.process_index, state.num_processes, str(state.device), state)


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items of process `rank`: those at an index i with i % world_size == rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"The process rank must be in [0, {world_size}); got {rank}.")
    return [item for index, item in enumerate(items) if index % world_size == rank]
