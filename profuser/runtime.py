"""Where and how fast a run computes, never what: the runtime options, the ranks of a launch and
the waits between processes. Nothing here is part of any cache key."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

IsolateStages = Literal["auto"] | bool


@dataclass
class Runtime:
    """Options that change where and how fast, never what: not part of any cache key."""

    runs_dir: Path = Path("runs")
    device: str = "auto"
    cache_dir: Path | None = None  # models (dequantised GGUF); default: ~/.cache/profuser
    progress: bool = True
    recipe_file: Path | None = None
    # run each stage that loads a model in its own spawned process (profuser.workers): "auto" = when
    # CUDA is visible, so that whatever a library leaks on the GPU is gone before the next stage
    isolate_stages: IsolateStages = "auto"
    # the plugin engine whose registry resolves ``builtin:`` models (load_model's engine=); set by
    # the runner, never pickled: a stage worker attaches the engine it rebuilt
    engine: Any = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "engine"}

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{local_rank()}"  # one GPU per process of a multi-process launch

    def isolates(self) -> bool:
        """Whether model stages run in worker processes (``auto``: when CUDA is visible)."""
        if self.isolate_stages != "auto":
            return bool(self.isolate_stages)
        if self.device.startswith("cpu"):
            return False
        return cuda_visible()


def cuda_visible() -> bool:
    """Whether a CUDA GPU is visible, without creating a CUDA context in this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    import torch

    return torch.cuda.is_available()


def runtime_of(component) -> Runtime:
    """The runtime a component was built with (``Registry.build(..., runtime=)``), or the
    defaults when it was made on its own."""
    return getattr(component, "runtime", None) or Runtime()


def rank_and_world() -> tuple[int, int]:
    """This process's rank under torchrun / accelerate launch / deepspeed (0 of 1 otherwise)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def wait_until(ready: Callable[[], Any], poll: float = 1.0) -> Any:
    """Poll ``ready()`` until it returns something truthy (another rank's work), and return that.
    No timeout: torchrun and accelerate end every rank when one fails."""
    while not (value := ready()):
        time.sleep(poll)
    return value
