"""AdamW with 32-bit or blockwise 8-bit states, each optionally paged to pinned host memory.

Update (Loshchilov & Hutter 2019, as torch.optim.AdamW):
    p = p (1 - lr wd);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
8-bit states (Dettmers et al. 2022): m and v are stored as uint8 codes into the signed / unsigned dynamic
maps with one fp32 absmax per block of 256, dequantized, updated and requantized every step
(kernels.adamw8bit; the resident states of a param group take one kernels.adamw8bit_multi launch per step).
Tensors smaller than `min_8bit_size` keep 32-bit states, as bitsandbytes does.
Paged: states of parameters that do not fit `gpu_memory_budget` (bytes of optimizer state on the device)
live in pinned host memory and are streamed through the device in pages (trainer/optim/paging.py).
"""
import math

import torch

from qlora_kit.kernels import adamw8bit, adamw8bit_multi

from .paging import PageStreamer
from .qmaps import signed_dynamic_map, unsigned_dynamic_map

_KEYS32 = ("exp_avg", "exp_avg_sq")
_KEYS8 = ("state1", "state2", "absmax1", "absmax2")


def _adamw32_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay) -> None:
    g32 = g.float()
    p32 = p if p.dtype == torch.float32 else p.float()
    p32.mul_(1 - lr * weight_decay)
    m.lerp_(g32, 1 - beta1)
    v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p32.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    if p32 is not p:
        p.copy_(p32)


class AdamW(torch.optim.Optimizer):
    """AdamW with optional 8-bit blockwise states and optional paging of the states to pinned host memory.

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay: AdamW hyperparameters (decoupled weight decay).
        optim_bits: 32 or 8.
        paged: keep states that exceed `gpu_memory_budget` in pinned host memory, streamed per page.
        gpu_memory_budget: bytes of optimizer state allowed on the device when paged; None = no limit,
            0 = page everything. Ignored unless paged.
        page_size: elements per page (a multiple of blocksize).
        min_8bit_size: tensors with fewer elements keep 32-bit states when optim_bits=8.
        blocksize: elements per 8-bit quantization block.
        backend: kernel backend for the 8-bit update (None/"auto", "torch", "triton").

    Raises:
        ValueError on an invalid hyperparameter.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, optim_bits: int = 32, paged: bool = False,
                 gpu_memory_budget: int | None = None, page_size: int = 1 << 21, min_8bit_size: int = 4096,
                 blocksize: int = 256, backend: str | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}: need lr, eps, "
                             "weight_decay >= 0 and 0 <= beta < 1")
        if optim_bits not in (8, 32):
            raise ValueError(f"AdamW: optim_bits={optim_bits}; use 32 or 8")
        if page_size <= 0 or page_size % blocksize:
            raise ValueError(f"AdamW: page_size={page_size} must be a positive multiple of blocksize={blocksize}")
        if gpu_memory_budget is not None and gpu_memory_budget < 0:
            raise ValueError(f"AdamW: gpu_memory_budget={gpu_memory_budget} must be >= 0 bytes (or None for no limit)")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.optim_bits, self.paged, self.gpu_memory_budget = optim_bits, paged, gpu_memory_budget
        self.min_8bit_size, self.blocksize, self.backend = min_8bit_size, blocksize, backend
        self._streamer = PageStreamer(page_size)
        self._device_bytes = 0
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- state placement ---------------------------------------------------------------------------
    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _state_bytes(self, p: torch.Tensor) -> int:
        n = p.numel()
        return 2 * n + 8 * -(-n // self.blocksize) if self._uses_8bit(p) else 8 * n

    def _on_host(self, p: torch.Tensor) -> bool:
        """Decide once per parameter (at state creation) whether its states are paged."""
        if not self.paged or self.gpu_memory_budget is None:
            return False
        need = self._state_bytes(p)
        if self._device_bytes + need <= self.gpu_memory_budget:
            self._device_bytes += need
            return False
        return True

    def _alloc(self, like: torch.Tensor, numel: int, dtype: torch.dtype, host: bool) -> torch.Tensor:
        if host and like.is_cuda:
            return torch.zeros(numel, dtype=dtype, pin_memory=True)
        return torch.zeros(numel, dtype=dtype, device=like.device)

    def _init_state(self, p: torch.Tensor, host: bool | None = None) -> dict:
        state = self.state[p]
        host = self._on_host(p) if host is None else host
        n = p.numel()
        state["step"] = 0
        state["paged"] = host
        if self._uses_8bit(p):
            blocks = -(-n // self.blocksize)
            state["state1"] = self._alloc(p, n, torch.uint8, host)
            state["state2"] = self._alloc(p, n, torch.uint8, host)
            state["absmax1"] = self._alloc(p, blocks, torch.float32, host)
            state["absmax2"] = self._alloc(p, blocks, torch.float32, host)
        else:
            state["exp_avg"] = self._alloc(p, n, torch.float32, host)
            state["exp_avg_sq"] = self._alloc(p, n, torch.float32, host)
        return state

    def _maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            self._qmaps[device] = (signed_dynamic_map(device), unsigned_dynamic_map(device))
        return self._qmaps[device]

    # ---- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            batch: dict = {}  # (step, device) -> resident 8-bit tensors (param, grad, codes, absmax) for adamw8bit_multi
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW: sparse gradients are not supported")
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                t = state["step"]
                flat_p = p.view(-1) if p.is_contiguous() else None
                if flat_p is None:
                    raise ValueError(f"AdamW: parameter of shape {tuple(p.shape)} is not contiguous")
                flat_g = p.grad.reshape(-1)
                eight = "state1" in state
                keys = _KEYS8 if eight else _KEYS32
                divisors = {k: (self.blocksize if k.startswith("absmax") else 1) for k in keys}

                def update(lo, hi, s, flat_p=flat_p, flat_g=flat_g, eight=eight, t=t):
                    if eight:
                        q1, q2 = self._maps(p.device)
                        adamw8bit(flat_p[lo:hi], flat_g[lo:hi], s["state1"], s["state2"], s["absmax1"], s["absmax2"],
                                  q1, q2, t, lr, beta1, beta2, eps, wd, self.blocksize, backend=self.backend)
                    else:
                        _adamw32_update(flat_p[lo:hi], flat_g[lo:hi], s["exp_avg"], s["exp_avg_sq"], t, lr, beta1,
                                        beta2, eps, wd)

                host = {k: state[k] for k in keys}
                if state["paged"]:
                    self._streamer.run(p.numel(), host, divisors, p.device, update)
                elif eight:  # resident 8-bit states: batched into one kernel launch per step count below
                    batch.setdefault((t, p.device), []).append((flat_p, flat_g, *(host[k] for k in _KEYS8)))
                else:
                    update(0, p.numel(), host)
            for (t, device), members in batch.items():
                q1, q2 = self._maps(device)
                adamw8bit_multi(*map(list, zip(*members)), q1, q2, t, lr, beta1, beta2, eps, wd, self.blocksize,
                                backend=self.backend)
        return loss

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self):
        self._streamer.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        """Load, keeping each state's saved dtype (torch would cast uint8 codes and absmax to the param dtype)."""
        saved = {i: dict(s) for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        self._device_bytes = 0
        for i, s in saved.items():
            p = params[i]
            fresh = self._init_state(p)  # placement follows this optimizer's budget, not the saved one
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    if k not in fresh or fresh[k].shape != v.shape or fresh[k].dtype != v.dtype:
                        raise ValueError(f"AdamW.load_state_dict: state {k!r} of parameter {i} is {v.dtype} "
                                         f"{tuple(v.shape)}; this optimizer expects a different layout "
                                         f"(optim_bits={self.optim_bits}, min_8bit_size={self.min_8bit_size})")
                    fresh[k].copy_(v)
            fresh["step"] = int(s["step"])


class AdamW8bit(AdamW):
    """AdamW with blockwise 8-bit states; see AdamW for the arguments."""

    def __init__(self, params, **kwargs):
        super().__init__(params, optim_bits=8, **kwargs)


class PagedAdamW(AdamW):
    """32-bit AdamW whose states are paged to pinned host memory beyond `gpu_memory_budget` (default: all paged)."""

    def __init__(self, params, gpu_memory_budget: int | None = 0, **kwargs):
        super().__init__(params, paged=True, gpu_memory_budget=gpu_memory_budget, **kwargs)


class PagedAdamW8bit(AdamW):
    """8-bit AdamW whose states are paged to pinned host memory beyond `gpu_memory_budget` (default: all paged)."""

    def __init__(self, params, gpu_memory_budget: int | None = 0, **kwargs):
        super().__init__(params, optim_bits=8, paged=True, gpu_memory_budget=gpu_memory_budget, **kwargs)
