"""One training step (forward, backward, gradient clipping, optimizer step), eager or as a
CUDA graph per input shape, and the linear learning-rate schedule both share.

The paper's recipe (batch 32, GLUE lengths) is launch-bound on a GPU: a stock eager loop spends
most of a step launching a few thousand small kernels (DESIGN.md §7). `CudaGraphStep` captures
the whole step, AdamW included, once per batch shape and replays it, so a step costs one
launch. What it computes is the eager step's computation:

  * the optimizer is AdamW with `capturable=True` and a tensor learning rate, which
    `LinearSchedule` fills in place (no host sync, the graph reads the new value);
  * capturing needs a few eager warm-up steps per new shape; the model, the optimizer state
    and the CUDA generator are snapshotted before and restored after, so warm-up and
    capture leave no trace on training;
  * all graphs share one memory pool. That is safe because everything that outlives a
    replay (parameters, optimizer state, the static inputs, the returned loss) lives outside
    the pool, and replays never overlap;
  * with fixed gates (`fixed_gates=True`, or SPARSEBERT_GRAPH_FIXED_GATES=1), the graphs are
    captured in a `FixedGates` block: what the gate buffers mask is left out of the graph (a
    masked MLP, the masked heads' products) rather than computed and multiplied by zero, and
    an in-place change of a gate buffer the capture relied on (set_masks) drops every graph
    before the next step, which captures anew. Warm-up and capture then also build padding
    masks as views (`padding_masks_as_views`), which the patched attention takes for key
    padding masks without reading them: the graphs run the masked-attention kernels, not SDPA
    over a materialised (B, 1, S, S) mask. Off by default: not yet run on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from sparsebert.checks import is_finite_number, is_integer
from sparsebert.graph_capture import capture
from sparsebert.hf.attention_backend import padding_masks_as_views
from sparsebert.nn.common import FixedGates
from sparsebert.switches import env_switch

Batch = dict[str, torch.Tensor]


class LinearSchedule:
    """lr(step) = peak * factor(step): linear warmup over `warmup_steps`, then linear decay to
    0 at `total_steps` (as transformers' get_linear_schedule_with_warmup).

    Works with float learning rates and with tensor ones (filled in place, so a captured
    optimizer step sees the new value without a host sync). Call step() after each
    optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, total_steps: int,
                 warmup_steps: int = 0) -> None:
        for name, value, low in (("total_steps", total_steps, 1),
                                 ("warmup_steps", warmup_steps, 0)):
            if not is_integer(value) or value < low:
                raise ValueError(f"LinearSchedule: {name!r} must be an integer >= {low}, got "
                                 f"{value!r}")
        if not is_finite_number(peak_lr) or peak_lr <= 0:
            raise ValueError(f"LinearSchedule: 'peak_lr' must be a finite number > 0, got "
                             f"{peak_lr!r}")
        self.optimizer, self.peak_lr = optimizer, float(peak_lr)
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

    def lr(self) -> float:
        return self.peak_lr * self.factor(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr()
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return [self.lr() for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "peak_lr": self.peak_lr,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # "last_epoch" is what torch's LambdaLR saved (checkpoints written before this class).
        self.step_count = int(state["step_count"] if "step_count" in state
                              else state["last_epoch"])
        self._apply()


def make_adamw(groups: list[dict[str, Any]], lr: float, eps: float,
               device: torch.device, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over parameter groups: fused where every parameter allows it (CPU and CUDA
    floating point; ~7x faster than the per-tensor loop on CPU). capturable=True (CUDA only)
    keeps the step count and the learning rate on the device so the step can be captured
    in a CUDA graph."""
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                 for p in params)
    if not capturable:
        return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=fused)
    if device.type != "cuda" or not all(p.is_cuda for p in params):
        raise ValueError("capturable AdamW needs every parameter on a CUDA device; move the "
                         "model to the GPU before building the optimizer")
    return torch.optim.AdamW(groups, lr=torch.tensor(lr, dtype=torch.float32, device=device),
                             eps=eps, fused=fused, capturable=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """optimizer.load_state_dict(state), keeping this optimizer's execution settings (tensor
    learning rate, capturable, fused, foreach): a checkpoint written by an eager CPU run
    resumes in a CUDA-graph run and vice versa. Call the schedule's load_state_dict after
    this: it sets the learning rate."""
    kept = [{k: group[k] for k in ("lr", "capturable", "fused", "foreach") if k in group}
            for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, kept, strict=True):
        group.update(settings)
        if group.get("capturable") or group.get("fused"):  # these keep the step on device
            for param in group["params"]:
                param_state = optimizer.state.get(param, {})
                if isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = param_state["step"].to(param.device, torch.float32)


@dataclass
class StepSettings:
    """What one training step does besides forward and backward."""

    grad_clip: float = 1.0  # max gradient norm, 0 = no clipping
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _forward_backward_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           settings: StepSettings, batch: Batch) -> torch.Tensor:
    """loss = model(**batch).loss; backward; clip; optimizer.step(). Returns the detached
    scalar loss; gradients are left in place."""
    with settings.autocast():
        loss = model(**batch).loss
    loss.backward()
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(_trainable(model), settings.grad_clip)
    optimizer.step()
    return loss.detach()


def _accumulated_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      settings: StepSettings, batches: list[Batch]) -> torch.Tensor:
    """One batch's step run as micro-batches (gradient accumulation): each micro-batch's mean
    loss, weighted by its share of the batch's examples, goes backward in turn, so that the
    gradients add up to those of the batch's mean loss; then clip and optimizer.step().
    Returns the detached batch mean loss."""
    sizes = [next(iter(batch.values())).shape[0] for batch in batches]
    total = sum(sizes)
    losses = []
    for batch, size in zip(batches, sizes, strict=True):
        with settings.autocast():
            loss = model(**batch).loss * (size / total)
        loss.backward()
        losses.append(loss.detach())
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(_trainable(model), settings.grad_clip)
    optimizer.step()
    return torch.stack(losses).sum()


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class EagerStep:
    """The plain training step; batches are moved to the model's device. A list of batches is
    one batch's micro-batches (gradient accumulation: one optimizer step for all of them)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 settings: StepSettings, device: torch.device) -> None:
        self.model, self.optimizer, self.settings, self.device = model, optimizer, settings, device

    def __call__(self, batch: Batch | list[Batch]) -> torch.Tensor:
        if isinstance(batch, list):
            micro = [self._moved(b) for b in batch]
            loss = _accumulated_step(self.model, self.optimizer, self.settings, micro)
        else:
            loss = _forward_backward_step(self.model, self.optimizer, self.settings,
                                          self._moved(batch))
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _moved(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Batch  # static input buffers the graph reads
    loss: torch.Tensor  # static scalar the graph writes


class CudaGraphStep:
    """The same step, captured as one CUDA graph per distinct batch shape and replayed.

    The optimizer must be AdamW built by `make_adamw(..., capturable=True)`. Shapes beyond
    `max_graphs` run eagerly (pad batches to a multiple of 8 or 16 to keep shapes few).
    The returned loss is a fresh device tensor (valid after later steps too).
    fixed_gates: capture in a FixedGates block (see the module docstring); None reads the
    SPARSEBERT_GRAPH_FIXED_GATES switch (default off).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 settings: StepSettings, device: torch.device, warmup_steps: int = 2,
                 max_graphs: int = 32, fixed_gates: bool | None = None) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaGraphStep needs a CUDA device, got {device}")
        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            raise ValueError(f"CudaGraphStep supports Adam/AdamW (their state starts at zero), "
                             f"got {type(optimizer).__name__}")
        for group in optimizer.param_groups:
            if not group.get("capturable") or not isinstance(group["lr"], torch.Tensor):
                raise ValueError("CudaGraphStep needs an optimizer built with capturable=True "
                                 "and a tensor lr (sparsebert.train.step.make_adamw(..., "
                                 "capturable=True))")
        self.model, self.optimizer, self.settings, self.device = model, optimizer, settings, device
        if fixed_gates is None:
            fixed_gates = env_switch("SPARSEBERT_GRAPH_FIXED_GATES")
        elif not isinstance(fixed_gates, bool):
            raise TypeError(f"CudaGraphStep: 'fixed_gates' must be None or a bool, got "
                            f"{fixed_gates!r}")
        self.warmup_steps, self.max_graphs = warmup_steps, max_graphs
        # With fixed gates: the gate buffers the captured graphs rely on, one record for all
        # of them (restoring the snapshot after a capture moves every buffer's version).
        self.gates = FixedGates() if fixed_gates else None
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = None
        self.eager = EagerStep(model, optimizer, settings, device)
        # A replay writes the parameters without running the optimizer's step hooks or moving
        # their version counters: __call__ moves the counters, so code that caches work on the
        # weights (sparsebert.accelerate's compact weights) sees every step.
        self.stepped = [p for group in optimizer.param_groups for p in group["params"]
                        if isinstance(p, torch.Tensor) and not p.is_inference()]

    @staticmethod
    def _key(batch: Batch) -> tuple:
        return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(batch.items()))

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.gates is not None and not self.gates.unchanged():
            self.drop_graphs()  # a gate the graphs rely on was written: capture anew
        key = self._key(batch)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                # Captured graphs left .grad pointing at their own buffers: start from None
                # so the eager backward does not accumulate into them.
                self.optimizer.zero_grad(set_to_none=True)
                return self.eager(batch)
            entry = self.graphs[key] = self._capture(batch)
        for name, tensor in batch.items():
            entry.inputs[name].copy_(tensor, non_blocking=True)
        entry.graph.replay()
        if self.stepped:
            torch.autograd.graph.increment_version(self.stepped)
        return entry.loss.clone()

    def drop_graphs(self) -> None:
        """Forget every captured graph (and their memory pool): the next step captures anew."""
        self.graphs.clear()
        self.pool = None
        if self.gates is not None:
            self.gates = FixedGates()
        self.optimizer.zero_grad(set_to_none=True)  # the gradients lived in the graphs' pool

    # -- capture ------------------------------------------------------------------------
    def _capture(self, batch: Batch) -> _Captured:
        inputs = {name: t.to(self.device).clone() for name, t in batch.items()}
        saved = snapshot(self.model, self.optimizer, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with contextlib.ExitStack() as fixed:
            if self.gates is not None:  # the gates read at warm-up, padding masks as views
                fixed.enter_context(self.gates)
                fixed.enter_context(padding_masks_as_views(self.model))
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: lazy inits, optimizer state, cuBLAS plans
                for _ in range(self.warmup_steps):
                    self.eager(inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # Gradients are None here, so backward allocates them inside the graph and every
            # replay overwrites (not accumulates) them: no zeroing kernel needed.
            with capture(graph, self.device, pool=self.pool):
                loss = _forward_backward_step(self.model, self.optimizer, self.settings, inputs)
        if self.pool is None:
            self.pool = graph.pool()
        restore(saved, self.optimizer)
        if self.gates is not None:
            self.gates.settle()  # restore wrote every buffer back (same values): versions moved
        return _Captured(graph, inputs, loss)


def _model_tensors(model: torch.nn.Module) -> Iterable[torch.Tensor]:
    seen: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             device: torch.device) -> dict[str, Any]:
    """Copies of the model's tensors, the optimizer state and the device's generator state."""
    had_state = {p for p in optimizer.state if optimizer.state[p]}
    optim = {(id(p), k): v.clone() for p in had_state
             for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
    rng = (torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    return {"model": [(t, t.detach().clone()) for t in _model_tensors(model)], "optim": optim,
            "had_state": had_state, "rng": rng, "device": device}


@torch.no_grad()
def restore(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Put back what snapshot() saved, in place (captured graphs keep their addresses).
    Optimizer state created since the snapshot is zeroed: Adam's initial state."""
    for tensor, value in saved["model"]:
        tensor.copy_(value)
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if param in saved["had_state"]:
                value.copy_(saved["optim"][(id(param), key)])
            else:
                value.zero_()
    if saved["device"].type == "cuda":
        torch.cuda.set_rng_state(saved["rng"], saved["device"])
    else:
        torch.set_rng_state(saved["rng"])


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    settings: StepSettings, device: torch.device, cuda_graphs: bool,
                    fixed_gates: bool | None = None) -> EagerStep | CudaGraphStep:
    """CudaGraphStep when cuda_graphs (CUDA only; fixed_gates as there), else EagerStep."""
    if cuda_graphs:
        return CudaGraphStep(model, optimizer, settings, device, fixed_gates=fixed_gates)
    return EagerStep(model, optimizer, settings, device)
