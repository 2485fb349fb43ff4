"""Head, MLP and neuron importance of a patched model, from gate gradients.

    imp = sparsebert.importance(model, batches, mode="paper")   # imp.head (L, H), imp.mlp (L,)

Modes (all gradients are taken at the model's current gates; weights are frozen, so no
weight-gradient GEMMs run):
  paper        the authors' code (PAPER.md §1.2): |d loss / d gate| of the batch-mean loss,
               abs per batch, summed over batches (gates shared by the batch). Unlike the
               authors' code, gradients are not carried over from one batch to the next.
  per_example  sum over examples of |d loss_i / d gate| (per-example gates (B, H), one pass).
  fisher       sum over examples of (d loss_i / d gate)^2 (Kwon et al. 2022).
  michel       Michel et al.: sum over examples and real tokens of |ctx_t . d loss_i / d ctx_t|.
               Their code then divides each layer's head sums by the token count, the last
               layer's by the example count (only [CLS] gets a gradient there); that per-layer
               factor cancels in the per-layer L2 normalisation (the default) and is not
               applied: with normalize_by_layer_heads=False the last layer's heads score lower
               relative to the other layers' than in their code.
The head gradients come from d_head_gate of the masked-attention backward kernel, the MLP and
neuron gradients from the fused group_dot reduction (sparsebert.nn.gating); `michel` needs
per-token values and uses tensor hooks instead (sparsebert.pruning.michel). In the gate-gradient
modes a sequence classifier's last layer runs at [CLS] only (sparsebert.hf.first_token_readout):
its gates' gradients come from that row alone, so the scores are the same.

Normalisation (normalize=True, each step switchable, as the paper's runs): head scores are
L2-normalised per layer, then min-max rescaled over the model; MLP and neuron scores are divided
by the number of real tokens, then min-max rescaled. As in the authors' code, a layer's L2 norm
counts the |gradient| of its masked heads too (the gate-gradient modes take their true gradient
at gate 0 for this, computing masked heads in the backward while scoring), so the last heads
left in a layer are not inflated by the norm. Pruned heads/MLPs/neurons (gate exactly 0) then
score 0 (masked heads keep that true score with score_masked_heads=True). Physically removed
heads have no gate, so they cannot count in their layer's norm: a pruned model's normalised head
scores can rank differently from the same model masked (a layer's one remaining head
normalises to 1 there; scoring the masked model is the authors' convention), though its raw scores
(normalize=False) are the masked model's. Scores are in the original (unpruned) numbering:
(L, H), (L,), (L, F) from the config.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsebert import precision as numerics
from sparsebert.hf.patching import sparse_blocks
from sparsebert.hf.readout import first_token_readout
from sparsebert.hf.structure import UnsupportedModelError, config_size, structure_for
from sparsebert.nn.common import eval_mode, quantized_linears
from sparsebert.ops import accumulate_importance_
from sparsebert.overrides import override_attributes
from sparsebert.precision import PRECISIONS
from sparsebert.pruning.michel import michel_hooks

MODES = ("paper", "per_example", "fisher", "michel")


@dataclass
class Importance:
    """Importance scores in the original numbering.

    head (L, H), mlp (L,), neuron (L, F) or None when not requested. per_example, when kept:
    {"head": (N, L, H), "mlp": (N, L), "neuron": (N, L, F)} of per-example |gradient| (per_example
    and fisher modes). examples / tokens: how much data was seen.
    """

    head: Tensor | None
    mlp: Tensor | None
    neuron: Tensor | None
    mode: str
    normalized: dict[str, bool]
    examples: int
    tokens: int
    per_example: dict[str, Tensor] | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable dict (tensors as nested lists)."""

        def lst(t: Tensor | None):
            return None if t is None else t.tolist()

        return {
            "head": lst(self.head),
            "mlp": lst(self.mlp),
            "neuron": lst(self.neuron),
            "mode": self.mode,
            "normalized": dict(self.normalized),
            "examples": self.examples,
            "tokens": self.tokens,
            "per_example": None
            if self.per_example is None
            else {k: v.tolist() for k, v in self.per_example.items()},
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Importance:
        def ten(x):
            return None if x is None else torch.tensor(x, dtype=torch.float32)

        missing = {"head", "mlp", "mode", "examples", "tokens"} - set(data)
        if missing:
            raise ValueError(f"Importance.from_dict: missing keys {sorted(missing)}")
        per_example = data.get("per_example")
        return cls(
            head=ten(data["head"]),
            mlp=ten(data["mlp"]),
            neuron=ten(data.get("neuron")),
            mode=str(data["mode"]),
            normalized=dict(data.get("normalized", {})),
            examples=int(data["examples"]),
            tokens=int(data["tokens"]),
            per_example=None
            if per_example is None
            else {k: ten(v) for k, v in per_example.items()},
            extra=dict(data.get("extra", {})),
        )


# --------------------------------------------------------------------------------------------
# Model state: frozen weights, eval mode, restored afterwards
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_for_scoring(model: nn.Module):
    """Eval mode, requires_grad=False on every parameter and grad mode on (a caller's no_grad
    would leave nothing to differentiate); each module's mode and each flag restored on exit
    (even on error)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model), torch.enable_grad():
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            yield model
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


_PASS_LOCKS: dict[int, threading.RLock] = {}  # id(model) -> its lock, while the model lives
_PASS_LOCKS_GUARD = threading.Lock()


def one_pass_per_model(score: Callable[..., Importance]) -> Callable[..., Importance]:
    """`score(model, ...)` runs one call per model at a time: a pass puts its own gate leaves,
    eval mode and requires_grad flags on the model, so a second thread's pass over the same
    model waits for it (passes over different models run side by side)."""

    @functools.wraps(score)
    def one_at_a_time(model: nn.Module, *args, **kwargs) -> Importance:
        with _PASS_LOCKS_GUARD:
            lock = _PASS_LOCKS.get(id(model))
            if lock is None:
                lock = _PASS_LOCKS[id(model)] = threading.RLock()
                weakref.finalize(model, _PASS_LOCKS.pop, id(model), None).atexit = False
        with lock:
            return score(model, *args, **kwargs)

    return one_at_a_time


def _capturing(tensor: Tensor) -> bool:
    """Whether a CUDA graph capture is under way on `tensor`'s device."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def per_example_loss(logits: Tensor, labels: Tensor, num_labels: int) -> Tensor:
    """(B,) losses: cross-entropy for classification, MSE for regression (num_labels == 1).
    labels: (B,), or (B, 1) as the model's own loss takes them."""
    if labels.dim() > 1 and labels.numel() == logits.shape[0]:
        labels = labels.reshape(-1)  # (B, 1) -> (B,): not broadcast against (B,) to (B, B)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"importance: 'labels' must be ({logits.shape[0]},), one per example, "
                         f"got {tuple(labels.shape)}")
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
    if not _capturing(labels):  # (a capture cannot read values: its replays check instead)
        check_class_ids(labels, num_labels)
    return F.cross_entropy(logits.float(), labels.long(), reduction="none")


def check_class_ids(labels: Tensor, num_labels: int) -> None:
    """Float class ids are taken when whole (a check only they pay for: it reads the values);
    ValueError for fractional ones. A regression model's (num_labels == 1) are not checked."""
    if (num_labels != 1 and labels.is_floating_point()
            and not torch.equal(labels, labels.round())):
        raise ValueError(f"importance: 'labels' of a {num_labels}-class model must be class "
                         f"ids, got fractional values (soft or multi-label targets are not "
                         f"supported)")


def _classes(batch: Mapping, num_labels: int) -> tuple[int, str]:
    """(how many classes the batch's labels choose from, what to call them): a multiple-choice
    batch's (input_ids (B, choices, L), inputs_embeds (B, choices, L, hidden)) labels pick one
    of its choices, whatever config.num_labels says; else the model's num_labels."""
    ids, embeds = batch.get("input_ids"), batch.get("inputs_embeds")
    for tensor, dims in ((ids, 3), (embeds, 4)):
        if isinstance(tensor, Tensor) and tensor.dim() == dims:
            return tensor.shape[1], f"{tensor.shape[1]}-choice inputs"
    return num_labels, f"a {num_labels}-class model"


def check_class_range(labels: Tensor, num_labels: int, what: str | None = None) -> None:
    """ValueError unless a classifier's (num_labels > 1) labels are class ids in
    [0, num_labels): an out-of-range id would fail inside cross_entropy, and -100 (Hugging
    Face's "ignore this example") would count as an example with zero loss. `what` names the
    classes in the message (default: "a {num_labels}-class model")."""
    if num_labels == 1 or labels.numel() == 0:
        return
    bad = labels[(labels < 0) | (labels >= num_labels)]
    if bad.numel():
        shown = sorted({float(v) if labels.is_floating_point() else int(v)
                        for v in bad.flatten()[:100].tolist()})[:5]
        raise ValueError(f"importance: 'labels' of {what or f'a {num_labels}-class model'} "
                         f"must be class ids in [0, {num_labels}), got {shown}"
                         + (" (-100, an ignored example: drop such examples from the batch)"
                            if -100 in shown else ""))


# --------------------------------------------------------------------------------------------
# Gate leaves for one batch
# --------------------------------------------------------------------------------------------
@dataclass
class _LayerLeaves:
    head: Tensor  # (H_l,) or (B, H_l)
    mlp: Tensor  # () or (B,)
    neuron: Tensor | None  # (F_l,) or (B, F_l)


def _make_leaves(blocks, batch: int, per_example: bool, neurons: bool) -> list[_LayerLeaves]:
    leaves = []
    for attn, mlp in blocks:
        head = attn.head_gate.detach().float()
        mlp_gate = mlp.mlp_gate.detach().float()
        neuron = mlp.neuron_gate.detach().float() if neurons else None
        if per_example:
            head = head.expand(batch, -1)
            mlp_gate = mlp_gate.expand(batch)
            neuron = None if neuron is None else neuron.expand(batch, -1)
        leaves.append(
            _LayerLeaves(
                head=head.clone().requires_grad_(True),
                mlp=mlp_gate.clone().requires_grad_(True),
                neuron=None if neuron is None else neuron.clone().requires_grad_(True),
            )
        )
    return leaves


@dataclass
class GateFacts:
    """What a pass knows of the model's gates (they do not change during a pass), per layer:
    whether a head is masked (gate exactly 0), whether a head is live (non-zero gate) and
    whether a neuron is live; None where not known (work it out per call)."""

    head_masked: list[bool]
    head_live: list[bool | None]
    neuron_live: list[bool | None]

    @classmethod
    def read(cls, blocks) -> GateFacts:
        """From the blocks' gate-buffer summaries (read on the host once per change of a
        buffer). A layer whose head summary is unknown counts as having a masked head: its
        true gradient at gate 0 is then computed, which changes nothing where none is."""
        facts = cls([], [], [])
        for attn, mlp in blocks:
            heads, neurons = attn.gate_summary(), mlp.gate_summaries()[1]
            facts.head_masked.append(True if heads is None else not heads.all_live)
            facts.head_live.append(None if heads is None else heads.any_live)
            facts.neuron_live.append(None if neurons is None else neurons.any_live)
        return facts


@contextlib.contextmanager
def _true_zero_gate_grads(blocks, enabled: bool, facts: GateFacts):
    """While scoring: masked heads (gate 0) get their true gate gradient (exact_zero_gate_grad),
    so that they count in the per-layer norm as in the authors' code; restored on exit. Only
    layers with a masked head get the flag: elsewhere it changes no gradient and would cost an
    extra attention call per layer in the backward."""
    with contextlib.ExitStack() as stack:
        if enabled:
            for (attn, _), masked in zip(blocks, facts.head_masked):
                stack.enter_context(override_attributes(
                    attn, exact_zero_gate_grad=attn.exact_zero_gate_grad or masked))
        yield


@contextlib.contextmanager
def _gates_overridden(blocks, leaves: list[_LayerLeaves], facts: GateFacts | None):
    """The leaves in place of the gates. With facts, each block is told which of its gates
    have a live entry in every row (leaves are the model's gate values, per-example leaves the
    same row repeated), so it does not work that out per call."""
    with contextlib.ExitStack() as stack:
        for layer, ((attn, mlp), leaf) in enumerate(zip(blocks, leaves)):
            head_live = None if facts is None else facts.head_live[layer]  # None: unknown
            neuron_live = None if facts is None else facts.neuron_live[layer]
            stack.enter_context(attn.override_head_gate(leaf.head, live=head_live))
            stack.enter_context(mlp.override_gates(mlp_gate=leaf.mlp, neuron_gate=leaf.neuron,
                                                   neurons_live=neuron_live))
        yield


# --------------------------------------------------------------------------------------------
# One batch: gate gradients and their accumulation
# --------------------------------------------------------------------------------------------
@dataclass
class GateGrads:
    """One batch's gate gradients per layer (None where a gate is unused: a layer's heads or
    MLP physically removed): head (H_l,) or (B, H_l), mlp () or (B,), neuron (F_l,) or (B, F_l)
    (an empty list when neurons are not scored)."""

    head: list[Tensor | None]
    mlp: list[Tensor | None]
    neuron: list[Tensor | None]


@dataclass
class ScoreSums:
    """Per-layer running sums of the scores: head (H_l,), mlp (), neuron (F_l,), views into one
    fp32 buffer `flat` laid out as [heads of every layer, MLPs, neurons of every layer], so that
    a batch's scores are added by one accumulate call (BatchScorer.accumulate)."""

    head: list[Tensor]
    mlp: list[Tensor]
    neuron: list[Tensor]
    flat: Tensor  # (sum_l H_l + L + sum_l F_l,)

    @classmethod
    def over(cls, heads: list[int], ffn: list[int], device: torch.device) -> ScoreSums:
        """Zeros for layers with heads[l] heads and ffn[l] neurons."""
        layers = len(heads)
        if len(ffn) != layers:
            raise ValueError(f"ScoreSums: {layers} layers of heads but {len(ffn)} of neurons")
        flat = torch.zeros(sum(heads) + layers + sum(ffn), device=device)
        parts = flat.split(list(heads) + [1] * layers + list(ffn))
        return cls(head=list(parts[:layers]),
                   mlp=[part.view(()) for part in parts[layers:2 * layers]],
                   neuron=list(parts[2 * layers:]), flat=flat)

    @classmethod
    def zeros(cls, blocks, device: torch.device) -> ScoreSums:
        return cls.over([a.num_heads for a, _ in blocks],
                        [m.intermediate_size for _, m in blocks], device)

    def zeros_like(self) -> ScoreSums:
        return ScoreSums.over([t.numel() for t in self.head], [t.numel() for t in self.neuron],
                              self.flat.device)


@dataclass
class BatchScorer:
    """The importance loop's body for one batch: forward with the gate leaves, per-example
    losses, backward to the leaves only, then |grad| (or grad^2) added to the running sums.
    Run eagerly, or captured once per batch shape in a CUDA graph (importance_graph).
    facts: the pass's one read of the gates (GateFacts), which lets the blocks skip working out
    per call which rows have live gates; None: they work it out."""

    model: nn.Module
    blocks: list
    mode: str
    precision: str
    num_labels: int
    neurons: bool
    device: torch.device
    autocast_cache: bool = True
    facts: GateFacts | None = None
    _leaves: dict = field(default_factory=dict, repr=False)
    _held: contextlib.ExitStack | None = field(default=None, repr=False)  # see held()
    _held_leaves: list | None = field(default=None, repr=False)

    def leaves(self, size: int) -> list[_LayerLeaves]:
        """Gate leaves for a batch of `size` examples: shared (paper, michel) or per example.
        Made once per size and reused: the gates do not change during a pass, and gradients are
        taken with torch.autograd.grad, which leaves the leaves untouched."""
        per_example = self.mode in ("per_example", "fisher")
        key = size if per_example else None
        if key not in self._leaves:
            self._leaves[key] = _make_leaves(self.blocks, size, per_example, self.neurons)
        return self._leaves[key]

    @contextlib.contextmanager
    def _scoring_setup(self, leaves: list[_LayerLeaves]):
        """The leaves in place of the gates and, except for michel (whose per-token hooks read
        every row), the last layer at [CLS] only where the classifier reads nothing else (its
        gates' exact gradients come from that row alone)."""
        readout = (first_token_readout(self.model) if self.mode != "michel"
                   else contextlib.nullcontext())
        with _gates_overridden(self.blocks, leaves, self.facts), readout:
            yield

    def _set_up(self, leaves: list[_LayerLeaves]):
        """The context a batch runs in: the scoring setup for `leaves`, entered per batch, or
        within held() entered once and kept between batches (again only when the leaves change:
        per-example leaves are made per batch size)."""
        if self._held is None:
            return self._scoring_setup(leaves)
        if self._held_leaves is not leaves:
            self._held.close()  # the previous leaves' setup, undone
            self._held_leaves = None
            self._held.enter_context(self._scoring_setup(leaves))
            self._held_leaves = leaves
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def held(self):
        """Within the block, the scoring setup (gate overrides on every block, the first-token
        readout) stays in place from one batch to the next instead of being entered and undone
        per batch: about 100 attribute writes per batch on a 12-layer model. Undone on exit,
        also on error."""
        if self._held is not None:
            raise RuntimeError("BatchScorer.held() is already open")
        self._held, self._held_leaves = contextlib.ExitStack(), None
        try:
            yield self
        finally:
            held, self._held, self._held_leaves = self._held, None, None
            held.close()

    def gradients(self, inputs: Mapping, labels: Tensor, leaves: list[_LayerLeaves],
                  hooks=None, extra_inputs: list[Tensor] | None = None) -> GateGrads:
        """d loss / d gate at the leaves: the batch-mean loss (paper) or the sum of per-example
        losses. hooks: a context entered with the leaves in place (michel's per-token hooks,
        which add the tensors they need gradients of to extra_inputs during the forward)."""
        extra_inputs = [] if extra_inputs is None else extra_inputs
        # the pass's precision alone, also in a caller's autocast region (the backward too)
        with (self._set_up(leaves), numerics.outside_autocast(self.device),
              hooks or contextlib.nullcontext()):
            with numerics.autocast(self.device, self.precision, self.autocast_cache):
                output = self.model(**inputs)
            logits = getattr(output, "logits", None)
            if not isinstance(logits, Tensor):
                raise TypeError(f"importance: the model returned {type(output).__name__} "
                                f"without logits; it needs a classification head (e.g. "
                                f"AutoModelForSequenceClassification): the loss defines the "
                                f"importance")
            # a multiple-choice model's logits have a row of choices, whatever num_labels says
            classes = _classes(inputs, self.num_labels)[0]
            if logits.dim() != 2 or logits.shape[-1] != classes:
                # e.g. per-token logits (B, S), as ElectraForPreTraining's: cross_entropy would
                # take the positions for classes and return scores that mean nothing
                raise ValueError(
                    f"importance: the model's logits are {tuple(logits.shape)}, not (batch, "
                    f"{classes}) = one row of {'a score' if classes == 1 else f'{classes} classes'}"
                    f" per example; it needs a sequence-level classification head (e.g. "
                    f"AutoModelForSequenceClassification): the loss defines the importance")
            losses = per_example_loss(logits.float(), labels, classes)  # (B,)
            loss = losses.mean() if self.mode == "paper" else losses.sum()
            wanted = [leaf.head for leaf in leaves] + [leaf.mlp for leaf in leaves]
            wanted += [leaf.neuron for leaf in leaves if leaf.neuron is not None]
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, wanted + extra_inputs, allow_unused=True)
            else:  # no gate reaches the loss (every head and MLP physically removed)
                grads = (None,) * len(wanted + extra_inputs)
        n = len(leaves)
        return GateGrads(head=list(grads[:n]), mlp=list(grads[n:2 * n]),
                         neuron=list(grads[2 * n:len(wanted)]))

    def accumulate(self, grads: GateGrads, sums: ScoreSums) -> None:
        """sums += |grad| (fisher: grad^2), summed over the batch's rows for per-example gates.
        Every layer's gradients in one accumulate call on the front of sums.flat (heads, MLPs,
        and neurons when scored, in its layout): two tensor ops per batch, not one per gate."""
        power = 2 if self.mode == "fisher" else 1
        pairs = list(zip(sums.head, grads.head)) + list(zip(sums.mlp, grads.mlp))
        if self.neurons:
            pairs += list(zip(sums.neuron, grads.neuron))
        given = [g for _, g in pairs if g is not None]
        if not given:
            return
        rows = given[0].shape[0] if self.mode in ("per_example", "fisher") else 1
        # A gate no output depends on (a removed MLP, a layer without heads) has no gradient:
        # it adds zeros (nothing where it has no entries).
        blocks = [g.float().reshape(rows, acc.numel()) if g is not None
                  else sums.flat.new_zeros(rows, acc.numel())
                  for acc, g in pairs if g is not None or acc.numel()]
        scores = torch.cat(blocks, dim=1)  # (R, n): this batch's scores in sums.flat's layout
        accumulate_importance_(sums.flat[:scores.shape[1]], scores, power)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def normalize_by_layer(scores: Tensor, exponent: float = 2.0) -> Tensor:
    """Each layer's row divided by its L-`exponent` norm (+1e-20), as the paper's code. (L, N)."""
    norm = scores.pow(exponent).sum(-1, keepdim=True).pow(1.0 / exponent)
    return scores / (norm + 1e-20)


def min_max(scores: Tensor) -> Tensor:
    """Rescale to [0, 1] over the whole tensor (unchanged if constant)."""
    low, high = scores.min(), scores.max()
    return scores if high <= low else (scores - low) / (high - low)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
def _batch_to(batch: Mapping, device: torch.device, num_labels: int,
              vocab_size: int | None = None) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"importance: each batch must be a dict of tensors, got {type(batch).__name__}"
        )
    if "labels" not in batch:
        raise ValueError("importance: batches need 'labels' (the loss defines the importance)")
    labels = batch["labels"]
    if (isinstance(labels, Tensor) and labels.device.type == "cpu"
            and labels.numel() == _examples(batch, labels.numel())):
        # (free here: on a GPU it would read them back; labels not one per example are refused
        # by their shape afterwards, e.g. a masked-LM batch's per-token ids)
        check_class_range(labels, *_classes(batch, num_labels))
    ids = batch.get("input_ids")
    if (vocab_size is not None and isinstance(ids, Tensor) and ids.device.type == "cpu"
            and ids.numel() and not bool(((ids >= 0) & (ids < vocab_size)).all())):
        raise ValueError(f"importance: 'input_ids' must be token ids in [0, vocab_size = "
                         f"{vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}] "
                         f"(a tokenizer of another model?)")
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _examples(batch: Mapping, default: int) -> int:
    """How many examples the batch holds (input_ids' or inputs_embeds' first size); `default`
    when it has neither (the token checks then say what is missing)."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(batch.get(key), Tensor) and batch[key].dim() >= 1:
            return batch[key].shape[0]
    return default


def _token_shape(batch: Mapping, mode: str) -> torch.Size:
    """The (B, L) of a batch's tokens, from input_ids or inputs_embeds (B, L, hidden). Inputs
    with more dimensions (multiple choice: (B, choices, L)) run several sequences per example,
    which per-example gates cannot follow: only mode="paper" scores them."""
    if isinstance(batch.get("input_ids"), Tensor):
        shape = batch["input_ids"].shape
    elif isinstance(batch.get("inputs_embeds"), Tensor):
        shape = batch["inputs_embeds"].shape[:-1]
    else:
        raise ValueError("importance: each batch needs 'input_ids' or 'inputs_embeds'")
    if len(shape) < 2:
        raise ValueError(f"importance: the batch's tokens must be (B, L), got {tuple(shape)} "
                         f"(a single sequence needs a batch dimension: input_ids[None])")
    if len(shape) != 2 and mode != "paper":
        raise ValueError(
            f"importance: mode={mode!r} gates each example's sequence, but the batch's tokens "
            f"are {tuple(shape)}, not (B, L) (multiple choice runs several sequences per "
            "example); use mode='paper'")
    return shape


@one_pass_per_model
def importance(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    heads: bool = True,
    mlps: bool = True,
    neurons: bool = False,
    mode: str = "paper",
    normalize: bool = True,
    normalize_by_layer_heads: bool | None = None,
    normalize_global: bool | None = None,
    normalize_mlp_by_tokens: bool | None = None,
    keep_per_example: bool = False,
    progress: bool = True,
    precision: str = "auto",
    score_masked_heads: bool = False,
    cuda_graph: bool = False,
) -> Importance:
    """Score heads (L, H), MLPs (L,) and optionally FFN neurons (L, F) of a patched model.

    score_masked_heads: heads masked by a gate of exactly 0 (not physically removed) keep the
    score of their true gradient at gate 0 instead of 0, per example too (gate-gradient modes;
    michel scores them 0 either way). The s-pruning search needs it: the authors' first step of
    phases 2 and 3 ranks the heads its failed step had masked by these scores (PAPER.md §1.3).
    A layer with every head masked still scores 0: its block is LayerNorm(residual), which no
    gate reaches (the authors' masked model keeps the attention output's bias there).

    precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16" (autocast on any
    device); the gates, their gradients and the accumulated scores stay fp32. Under bf16 the
    linears' fp32 weights are cast to bf16 once for the pass (sparsebert.precision), not
    by autocast on every batch: the same values, about half their size again in memory meanwhile.

    cuda_graph: replay each batch from a CUDA graph captured once per batch shape (forward,
    backward and accumulation; sparsebert.pruning.importance_graph): a batch then costs one
    launch instead of a few thousand. CUDA models and the gate-gradient modes only (michel's
    hooks run eagerly); each new shape costs two eager passes and a capture, so pad batches to
    few shapes.

    batches: an iterable of dicts as the model takes them, labels included (e.g. input_ids,
    attention_mask, token_type_ids, labels; or inputs_embeds for input_ids). A classifier's
    labels are class ids in [0, num_labels), every example labelled (no -100; checked where
    they come on the CPU). Multiple-choice inputs (B, choices, L) score in mode "paper" only.
    The model's training mode, requires_grad flags and gates are restored afterwards, even on
    error. Calls on one model from several threads run one at a time (each its own scores).
    See the module docstring for the modes.
    """
    if mode not in MODES:
        raise ValueError(f"importance: 'mode' must be one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(
            f"importance: 'precision' must be one of {PRECISIONS}, got {precision!r}"
        )
    if not (heads or mlps or neurons):
        raise ValueError("importance: nothing to score (heads, mlps and neurons are all False)")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("importance: called under torch.inference_mode(), where no gradient "
                           "can be taken; call it outside that block (torch.no_grad() is fine: "
                           "the pass turns gradients on for itself)")
    if isinstance(batches, Mapping):
        raise TypeError("importance: 'batches' must be an iterable of batches (dicts of tensors), "
                        "got a single dict; pass [batch]")
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes, Tensor)):
        raise TypeError(f"importance: 'batches' must be an iterable of batches (dicts of "
                        f"tensors), got {type(batches).__name__}")
    if keep_per_example and mode not in ("per_example", "fisher"):
        raise ValueError("importance: keep_per_example needs mode='per_example' or 'fisher'")
    blocks = sparse_blocks(model)  # raises if not patched
    quantized = quantized_linears(model)
    if quantized:  # autograd passes nothing through them: every gate gradient would be None (0)
        raise UnsupportedModelError(
            f"importance: the model has quantized linears ({', '.join(quantized[:3])}"
            f"{', ...' if len(quantized) > 3 else ''}), which autograd cannot differentiate, so "
            f"every score would be 0: score the float model, then quantize it")
    row = structure_for(model)
    _n_layers, n_heads = len(blocks), config_size(model, row, "num_heads")
    n_ffn = config_size(model, row, "intermediate_size")
    num_labels = int(model.config.num_labels)
    vocab_size = getattr(model.config, "vocab_size", None)
    device = next(model.parameters()).device

    sums = ScoreSums.zeros(blocks, device)
    kept: dict[str, list[Tensor]] = {"head": [], "mlp": [], "neuron": []}
    examples = 0
    token_count = torch.zeros((), dtype=torch.long, device=device)
    flags = {
        "heads_by_layer": normalize
        if normalize_by_layer_heads is None
        else normalize_by_layer_heads,
        "global_min_max": normalize if normalize_global is None else normalize_global,
        "mlp_by_tokens": normalize if normalize_mlp_by_tokens is None else normalize_mlp_by_tokens,
    }
    # Masked heads' |gradient| enters their layer's norm (the authors' code); michel's per-token
    # scores of a masked head are 0 (its context is), as in Michel et al.'s code.
    masked_heads_in_norm = heads and flags["heads_by_layer"] and mode != "michel"
    true_masked_grads = masked_heads_in_norm or (heads and score_masked_heads and mode != "michel")
    facts = GateFacts.read(blocks)
    scorer = BatchScorer(model, blocks, mode, precision, num_labels, neurons, device, facts=facts)
    graphed = None
    if cuda_graph:
        from sparsebert.pruning.importance_graph import GraphedScorer  # noqa: PLC0415

        graphed = GraphedScorer(scorer, sums)  # raises for a CPU model or mode="michel"

    # bf16: the frozen linears' weights cast once for the pass, not by autocast per batch.
    with (frozen_for_scoring(model), numerics.weights_cast_once(model, precision, device),
          _true_zero_gate_grads(blocks, true_masked_grads, facts), scorer.held()):
        for batch in tqdm(batches, desc=f"importance ({mode})", disable=not progress, leave=False):
            batch = _batch_to(batch, device, num_labels, vocab_size)
            labels = batch.pop("labels")
            token_shape = _token_shape(batch, mode)  # (B, L)
            if not isinstance(labels, Tensor):
                raise TypeError(f"importance: 'labels' must be a tensor ({token_shape[0]},), "
                                f"got {type(labels).__name__}")
            if labels.dim() == 0 or labels.shape[0] != token_shape[0] or (
                    labels.numel() != token_shape[0]):  # (B,) or (B, 1)
                raise ValueError(f"importance: 'labels' must be ({token_shape[0]},), one per "
                                 f"example, got {tuple(labels.shape)}"
                                 + (": per-token labels (a masked-LM or token-classification "
                                    "batch) give no per-example loss; importance needs a "
                                    "sequence-level classification head (e.g. "
                                    "AutoModelForSequenceClassification)"
                                    if labels.shape == token_shape else ""))
            size = labels.shape[0]
            token_mask = batch.get("attention_mask")
            if token_mask is not None and (not isinstance(token_mask, Tensor)
                                           or token_mask.shape != token_shape):
                raise ValueError(f"importance: 'attention_mask' must be a tensor shaped like "
                                 f"the tokens {tuple(token_shape)}, got "
                                 f"{tuple(getattr(token_mask, 'shape', ())) or token_mask!r}")
            token_mask = (
                torch.ones(token_shape, device=device) if token_mask is None else token_mask
            ).bool()
            examples += size
            token_count = token_count + token_mask.sum()  # on the device: no sync per batch
            if graphed is not None:
                # Forward, backward and accumulation replayed from the batch shape's graph.
                grads, leaves = graphed(batch, labels)
            elif mode == "michel":
                # Per-token scores, accumulated by the hooks during the backward.
                extra_inputs: list[Tensor] = []  # leaves for inputs that depend on no gate
                michel_sums = {"head": sums.head, "mlp": sums.mlp, "neuron": sums.neuron}
                hooks = michel_hooks(blocks, token_mask, michel_sums, neurons, extra_inputs)
                scorer.gradients(batch, labels, scorer.leaves(size), hooks, extra_inputs)
                continue
            else:
                # Gate leaves (shared by the batch, or per example) replace the buffers; forward,
                # backward to the leaves; |grad| (or grad^2) added per batch or per example.
                leaves = scorer.leaves(size)
                grads = scorer.gradients(batch, labels, leaves)
                scorer.accumulate(grads, sums)
            if keep_per_example:
                kept_rows = _per_example_rows(blocks, grads, leaves, size, n_heads, n_ffn,
                                              neurons, score_masked_heads)
                for key, value in kept_rows.items():
                    kept[key].append(value)

    if examples == 0:
        raise ValueError("importance: 'batches' was empty")
    tokens = int(token_count)
    # Pruned components (gate exactly 0) score exactly 0: heads after their layer's norm (which
    # counts them, see masked_heads_in_norm), MLPs and neurons now. (Their true gradient, from
    # set_zero_gate_grad or the norm, must not count as a score.)
    for layer, (_, mlp_block) in enumerate(blocks):
        sums.mlp[layer] = sums.mlp[layer] * (mlp_block.mlp_gate != 0)
        sums.neuron[layer] = sums.neuron[layer] * (mlp_block.neuron_gate != 0)
    head = _to_original(blocks, sums.head, "head", n_heads) if heads else None
    live = (_to_original(blocks, [(a.head_gate != 0).float() for a, _ in blocks], "head", n_heads)
            if heads else None)  # (L, H)
    mlp = torch.stack([m.float() for m in sums.mlp]).cpu() if mlps else None
    neuron = _to_original(blocks, sums.neuron, "neuron", n_ffn) if neurons else None
    if head is not None and flags["heads_by_layer"]:
        head = normalize_by_layer(head)
    if head is not None and not score_masked_heads:
        head = head * live  # (L, H)
    if flags["mlp_by_tokens"]:
        mlp = None if mlp is None else mlp / tokens
        neuron = None if neuron is None else neuron / tokens
    if flags["global_min_max"]:
        head, mlp, neuron = (None if t is None else min_max(t) for t in (head, mlp, neuron))
    per_ex = None
    if keep_per_example:
        per_ex = {k: torch.cat(v) for k, v in kept.items() if v}
    return Importance(
        head=head,
        mlp=mlp,
        neuron=neuron,
        mode=mode,
        normalized=flags,
        examples=examples,
        tokens=tokens,
        per_example=per_ex,
    )


def _per_example_rows(blocks, grads: GateGrads, leaves: list[_LayerLeaves], size: int,
                      n_heads: int, n_ffn: int, neurons: bool,
                      score_masked_heads: bool) -> dict[str, Tensor]:
    """One batch's per-example |gradient| in the original numbering, on the CPU: head (B, L, H),
    mlp (B, L), neuron (B, L, F). Pruned components score 0 (masked heads keep their score with
    score_masked_heads); a gate that is not used (every head or the MLP of a layer physically
    removed) has no gradient and scores 0 for every example."""
    def filled(gs: list[Tensor | None], ws: list[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, ws)]

    head_g = filled(grads.head, [leaf.head for leaf in leaves])
    mlp_g = filled(grads.mlp, [leaf.mlp for leaf in leaves])
    rows = {"head": _to_original(
        blocks, [g.abs() if score_masked_heads else g.abs() * (a.head_gate != 0)
                 for g, (a, _) in zip(head_g, blocks)], "head", n_heads, size)}
    live = torch.stack([(m.mlp_gate != 0).float() for _, m in blocks]).cpu()  # (L,)
    rows["mlp"] = torch.stack([g.abs().float() for g in mlp_g], dim=1).cpu() * live  # (B, L)
    if neurons:
        neuron_g = filled(grads.neuron, [leaf.neuron for leaf in leaves])
        rows["neuron"] = _to_original(blocks, [g.abs() * (m.neuron_gate != 0)
                                               for g, (_, m) in zip(neuron_g, blocks)],
                                      "neuron", n_ffn, size)
    return rows


def _to_original(
    blocks, per_layer: list[Tensor], what: str, size: int, batch: int | None = None
) -> Tensor:
    """Scatter per-layer scores in current numbering into the original numbering.

    per_layer[l]: (N_l,) or, with batch, (B, N_l) / (N_l,) per example; returns (L, size) or
    (B, L, size) on the CPU (removed entries 0)."""
    rows = []
    for (attn, mlp), scores in zip(blocks, per_layer):
        ids = attn.head_ids if what == "head" else mlp.neuron_ids
        scores = scores.detach().float().cpu()
        if batch is None:
            row = torch.zeros(size)
            row[ids] = scores
        else:
            scores = scores.expand(batch, -1) if scores.dim() == 1 else scores
            row = torch.zeros(batch, size)
            row[:, ids] = scores
        rows.append(row)
    return torch.stack(rows, dim=-2)
