"""Where and how a job runs: the device it picks, its synchronisation, its progress bar."""
from __future__ import annotations



import torch

from harness.core.errors import UserError


def pick_device(name: str | None = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; any other name is used as given."""

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise UserError(f"device {name!r} is not a device: cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r}: didbench runs on cpu or cuda (or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA device is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return str(name)


def synchronize(device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr (updates at most every 5 s so cluster logs stay short)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", 5.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
