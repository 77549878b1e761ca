"""A CPU platform for VERL 0.9.1, so its own training engine runs in one process without a GPU.

VERL routes every device call through ``verl.plugin.platform.get_platform()``; with no accelerator it
falls back to CUDA (``"nvidia"``) and the first ``torch.cuda`` call fails. This module registers a
``"cpu"`` platform (``VERL_PLATFORM=cpu`` selects it in any process that imports this module) and
:func:`install` puts it in place in the current process:

* ``device_name`` ``"cpu"``, communication backend ``gloo``, the current device ``"cpu"`` (VERL moves
  tensors with ``.to(get_device_id())``; an integer would mean ``cuda:N``);
* ``device_module``: ``torch.cpu`` plus the memory-statistics calls VERL logs (``max_memory_allocated``
  and friends report 0: CPU memory is measured by VERL separately with psutil).

What stays outside this module (see ``ctpo.backends.verl.step``): VERL registers its FSDP engine for
``cuda``/``npu`` only, so the step sets ``VERL_ENGINE_DEVICE=cuda`` to *select* that engine (FSDP2 itself
runs on CPU over gloo), and it initialises the one-process gloo group before VERL would try
``"cpu:gloo,cpu:gloo"`` (VERL's ``f"cpu:gloo,{device}:{backend}"`` names gloo twice on CPU).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry, get_platform, set_platform


class _CPUDeviceModule:
    """``torch.cpu`` with the CUDA-style memory API VERL calls on its device module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def get_device_name(*args: Any) -> str:
        return "CPU"  # the key of VERL's flops table (verl.utils.flops_counter) for the MFU metric

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(*args: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *args: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def mem_get_info(*args: Any) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def memory_allocated(*args: Any) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(*args: Any) -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(*args: Any) -> None:
        return None


@PlatformRegistry.register(platform="cpu")
class CPUPlatform(PlatformBase):
    """VERL platform for a machine without accelerators (``VERL_PLATFORM=cpu``)."""

    _module = _CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return self._module  # type: ignore[return-value]  # duck-typed module

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:  # type: ignore[override]  # "cpu", see the module docstring
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def install() -> PlatformBase:
    """Make :class:`CPUPlatform` VERL's platform in this process (idempotent) and return it."""
    os.environ["VERL_PLATFORM"] = "cpu"
    current = get_platform()  # resolves VERL_PLATFORM=cpu unless a platform was already created
    if not isinstance(current, CPUPlatform):
        set_platform(CPUPlatform())
    return get_platform()
