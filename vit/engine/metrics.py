"""Throughput and MFU of the training loop, recorded in the run journal."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch

from vit.journal import Journal

# Dense bf16 peak FLOP/s by device-name fragment (datasheets), the first that matches: the PCIe and
# NVL parts of a name are slower than its SXM part ("NVIDIA H100 80GB HBM3").
PEAK_FLOPS = {"H100 PCIe": 756e12, "H800 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class MetricsLogger:
    """Throughput and MFU of each log window, recorded once: as a `metrics` event of the run journal
    (rank 0), which status, plots and TensorBoard read; and shown as a progress bar or a line.

    The loss is written as a Python float (full fp64 repr of the fp32 value) so runs compare exactly.
    """

    def __init__(self, journal: Journal, enabled: bool, total_steps: int, start_step: int, flops_per_image: float,
                 world_size: int, device: torch.device, progress: bool | None = None):
        self.journal, self.enabled, self.total_steps = journal, enabled, total_steps
        self.flops_per_image, self.world_size, self.device = flops_per_image, world_size, device
        self.peak = peak_flops(device)
        show = sys.stderr.isatty() if progress is None else progress
        self.bar = None
        if enabled and show:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.window_start, self.window_images = time.perf_counter(), 0
        self.last: dict = {}

    def step(self, images: int) -> None:
        self.window_images += images
        if self.bar is not None:
            self.bar.update(1)

    @contextmanager
    def paused(self):
        """Time spent inside (an evaluation, a checkpoint save) is left out of images/s and MFU: they
        measure training, and the planner takes its MFU from them."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - start

    def log(self, step: int, **values) -> dict:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        images_per_s = self.window_images / elapsed
        tflops = images_per_s * self.flops_per_image / self.world_size / 1e12
        record = {**values, "images_per_s": images_per_s, "tflops_per_device": tflops,
                  "mfu": tflops * 1e12 / self.peak if self.peak else None}
        if self.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.window_start, self.window_images = time.perf_counter(), 0
        self.last = {"step": step, **record}
        if self.enabled:
            self.journal.write("metrics", step, **record)
            text = f"loss {record['loss']:.4f} lr {record['lr']:.2e} gnorm {record['grad_norm']:.3f} {images_per_s:.1f} img/s"
            if record["mfu"] is not None:
                text += f" mfu {record['mfu']:.1%}"
            if self.bar is not None:
                self.bar.set_postfix_str(text)
            else:
                print(f"step {step}/{self.total_steps} {text}", flush=True)
        return self.last

    def show(self, record: dict) -> None:
        """An extra record (e.g. an evaluation, which the caller journals) on the console."""
        if self.enabled:
            text = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
