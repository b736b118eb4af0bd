"""Tensor memory a training step really holds, counted tensor by tensor, beside process RSS.

Process RSS (ru_maxrss) also counts the interpreter, every imported library and the allocator's free lists,
so on a 135M model it mostly says which libraries were imported. `TensorBytes` counts the tensors instead:
  static      parameters + buffers of the model (the frozen 4-bit base included) + optimizer state
  grads       gradients of the trainable parameters (held from backward until zero_grad)
  activations peak of the live tensors saved for backward (autograd saved_tensors_hooks: a storage counts from
              the moment it is saved until the last saved reference to it is freed; storages of parameters and
              buffers are not counted twice)
Each storage is counted once (views share one). Not counted: short-lived temporaries inside an op (e.g. a
weight dequantized for one matmul, a logits chunk), which only an allocator trace sees. On CUDA,
torch.cuda.max_memory_allocated is that trace and is reported instead.
"""
import resource
import weakref

import torch


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _sum(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type == "meta":
            continue
        ptr, n = _storage(t)
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += n
    return total


class TensorBytes:
    """Count a model's and optimizer's tensors, and the peak of saved activations over the steps run under it.

    with TensorBytes(model, opt) as mem:
        step()
    mem.report() -> {"static_mb", "grads_mb", "activations_peak_mb", "tracked_peak_mb"}
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.live: dict[int, list] = {}  # storage ptr -> [bytes, saved references alive]
        self.current = self.peak = 0
        self.grads = 0
        self._hooks = None

    def _own(self) -> set:
        return {_storage(t)[0] for t in (*self.model.parameters(), *self.model.buffers())}

    def _pack(self, t: torch.Tensor):
        ptr, n = _storage(t)
        if ptr and ptr not in self._static:
            entry = self.live.get(ptr)
            if entry is None:
                entry = self.live[ptr] = [n, 0]
                self.current += n
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return t

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __enter__(self):
        self._static = self._own()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        # grads: what backward leaves on the trainable parameters (they are set to None by zero_grad, so size them)
        self.grads = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def report(self) -> dict:
        seen: set = set()
        model_b = _sum((*self.model.parameters(), *self.model.buffers()), seen)
        opt_b = _sum((v for st in self.optimizer.state.values() for v in st.values()), seen)
        mb = 2**20
        return {"model_mb": model_b / mb, "optimizer_mb": opt_b / mb, "grads_mb": self.grads / mb,
                "activations_peak_mb": self.peak / mb,
                "tracked_peak_mb": (model_b + opt_b + self.grads + self.peak) / mb}


def peak_rss_mb() -> float:
    """This process's peak resident set (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
