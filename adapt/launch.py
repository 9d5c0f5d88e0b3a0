"""How the training processes were launched, and what accelerate needs to shard on CPU processes."""

import os

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin


def launched_with_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_cpu_processes() -> None:
    """Let an FSDP launch (`accelerate launch --config_file recipes/accelerate/fsdp.yaml`) shard on CPU processes.

    accelerate 1.15 promotes its state to FSDP only on accelerators: on CPU processes (gloo) it silently runs plain
    DDP instead, every process holding the whole model and optimizer. torch's FSDP2 itself shards on CPU, so the state
    is set up as FSDP here, before the Trainer creates its Accelerator (which then reuses this shared state); that is
    what lets CI run the 8B launch path on CPU processes.
    """
    if not launched_with_fsdp() or torch.cuda.is_available():
        return
    state = AcceleratorState(cpu=True, dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        # The Accelerator copies the process state over its own: both must say FSDP.
        PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
