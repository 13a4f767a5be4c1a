# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Memory measurement: live tensor bytes and dispatched operators through torch dispatch modes, the process RSS
high-water mark (with glibc's malloc pinned to mmap), parameter bytes, and a fresh-process runner for measurements
that must not disturb the calling process."""

import gc
import weakref

import torch


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storage allocated while the mode is active and still alive, on any device including
    `meta` (shapes only). Storage that existed before (parameters, inputs) and views of it are not counted; an
    allocation is freed when its storage is garbage collected. Timing runs must not use it (dispatch overhead)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for tensor in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor):
                inputs.add(tensor.untyped_storage()._cdata)
        for tensor in torch.utils._pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:
                continue
            self.live[key] = storage.nbytes()
            self.current += self.live[key]
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


class DispatchedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators a call dispatches: a noise-free view of the work two implementations do."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def peak_live_bytes(fn) -> int:
    gc.collect()
    with torch.inference_mode(), LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pin_malloc_to_mmap(threshold: int = 64 * 1024) -> bool:
    """glibc only: serve every allocation of `threshold` bytes or more with mmap, returned to the kernel on free
    (a fixed threshold also turns off glibc's adaptive threshold). Then the RSS high-water mark follows the live
    large tensors instead of heap pages glibc keeps. Slows allocation down: call it after the timing runs."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        ok = libc.mallopt(m_mmap_threshold, int(threshold)) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def rss_peak_delta(fn) -> int | None:
    """Peak resident-set growth (bytes) while `fn()` runs: resets the kernel's high-water mark (VmHWM) through
    /proc/self/clear_refs, then reads it. None where that is not possible. Counts everything the process touches
    (allocator slack, thread stacks, buffers outside torch); see `pin_malloc_to_mmap`."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, (peak - before) * 1024)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _subprocess_target(queue, fn, args):
    torch.set_num_threads(1)
    try:
        queue.put(("ok", fn(*args)))
    except Exception as error:  # reported to the parent
        queue.put(("error", repr(error)))


def in_subprocess(fn, *args):
    """Runs `fn(*args)` in a fresh spawned interpreter and returns its (picklable) result, {} on failure."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_subprocess_target, args=(queue, fn, args))
    process.start()
    try:
        status, value = queue.get(timeout=600)
    except Exception as error:
        status, value = "error", repr(error)
    process.join(timeout=60)
    return value if status == "ok" else {"error": value}
