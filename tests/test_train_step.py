"""Training steps: the eager step equals a stock PyTorch loop exactly (fp32, CPU), the linear
schedule equals transformers', and the CUDA-graph step equals the eager step on a GPU."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

import sparsebert.hf as sbhf
from sparsebert.pruning.weight_masks import WeightMasks
from sparsebert.train import (
    TrainConfig,
    TrainError,
    autocast,
    finetune,
    make_optimizer,
    use_cuda_graphs,
)
from sparsebert.train.step import (
    CudaGraphStep,
    EagerStep,
    LinearSchedule,
    StepSettings,
    load_optimizer_state,
    restore,
    snapshot,
)
from tests.conftest import word_tokenizer


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))

CUDA = torch.cuda.is_available()


def cuda_test(fn):
    """Marks a test as CUDA-only (selected by `-m cuda`, skipped without a GPU)."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="no CUDA device")(fn))


def tiny_classifier(dropout: float = 0.1, seed: int = 0) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        num_labels=3)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).train()


def make_batches(shapes: list[tuple[int, int]], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random padded batches of the given (B, S) shapes; the last row of each is shorter."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch_size, width in shapes:
        lengths = torch.randint(width // 2, width + 1, (batch_size,), generator=gen)
        lengths[0] = width
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, S)
        ids = torch.randint(1, 100, (batch_size, width), generator=gen) * mask
        out.append({"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.randint(0, 3, (batch_size,), generator=gen)})
    return out


SHAPES = [(8, 16), (8, 32), (8, 16), (5, 32), (8, 32), (8, 16)]


def stock_loop(model, batches, lr: float, total_steps: int, warmup: int,
               clip: float = 1.0) -> list[float]:
    """What a user writes with torch + transformers (the paper's recipe, fp32)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-8, weight_decay=0.0,
                                  fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def sparsebert_loop(model, batches, lr: float, total_steps: int, warmup: int,
                    device: torch.device, graphs: bool, precision: str = "fp32",
                    masks: WeightMasks | None = None, clip: float = 1.0) -> list[float]:
    config = TrainConfig(lr=lr, warmup_steps=warmup).resolved()
    optimizer, schedule = make_optimizer(model, config, total_steps, capturable=graphs)
    if masks is not None:
        masks.attach(optimizer)
    settings = StepSettings(clip, lambda: autocast(device, precision, cache_enabled=not graphs))
    step = (CudaGraphStep if graphs else EagerStep)(model, optimizer, settings, device)
    losses = []
    for batch in batches:
        losses.append(step(batch))
        schedule.step()
    return [float(loss) for loss in losses]


def test_eager_step_equals_stock_loop_exactly():
    batches = make_batches(SHAPES)
    stock, ours = tiny_classifier(), tiny_classifier()
    torch.manual_seed(5)
    expected = stock_loop(stock, batches, 1e-3, total_steps=8, warmup=2)
    torch.manual_seed(5)
    got = sparsebert_loop(ours, batches, 1e-3, 8, 2, torch.device("cpu"), graphs=False)
    assert got == expected
    for (name, a), b in zip(stock.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_weight_masks_train_as_torch_prune_does():
    """Fixed weight masks as the authors held them (torch.nn.utils.prune.custom_from_mask:
    weight = weight_orig * mask): the same losses and weights, gradient clipping included (the
    masked weights' gradients stay out of the clipped norm)."""
    from torch.nn.utils import prune  # noqa: PLC0415

    batches = make_batches(SHAPES)
    stock, ours = tiny_classifier(dropout=0.0), tiny_classifier(dropout=0.0)
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.intermediate.dense",
             "bert.encoder.layer.1.output.dense"]
    generator = torch.Generator().manual_seed(1)
    pairs = []
    for name in names:
        mask = torch.rand(ours.get_submodule(name).weight.shape, generator=generator) > 0.3
        prune.custom_from_mask(stock.get_submodule(name), "weight", mask)
        pairs.append((ours.get_submodule(name).weight, mask))
    torch.manual_seed(5)
    clip = 0.05  # below every step's gradient norm (0.3 to 0.6): clipping acts at each step
    expected = stock_loop(stock, batches, 1e-2, total_steps=8, warmup=2, clip=clip)
    torch.manual_seed(5)
    got = sparsebert_loop(ours, batches, 1e-2, 8, 2, torch.device("cpu"), graphs=False,
                          masks=WeightMasks(pairs), clip=clip)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Adam hides a constant rescaling of the gradient; the norm that clipping sees does not.
    for model in (stock, ours):
        model.zero_grad()
        model(**batches[0]).loss.backward()
    norms = [float(torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]))
             for m in (stock, ours)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    for name in names:
        prune.remove(stock.get_submodule(name), "weight")  # weight = weight_orig * mask, a param
    expected_state = stock.state_dict()
    assert expected_state.keys() == ours.state_dict().keys()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected_state[name], rtol=1e-5, atol=1e-6, msg=name)


def test_weight_masks_gradient_hooks_come_off():
    """attach()'s handles remove the gradient masking too: the model trains freely after."""
    model = tiny_classifier(dropout=0.0)
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handles = WeightMasks([(weight, mask)]).attach(optimizer)
    batch = make_batches([(4, 8)])[0]
    model(**batch).loss.backward()
    assert weight.grad is not None and not weight.grad.any()
    handles.remove()
    model.zero_grad()
    model(**batch).loss.backward()
    assert weight.grad.any()


def test_weight_masks_on_a_frozen_parameter():
    """A frozen (requires_grad=False) masked parameter is zeroed and stays so; the trainable
    ones' gradients are masked as usual, and every hook comes off."""
    model = tiny_classifier(dropout=0.0)
    layer = model.bert.encoder.layer[0]
    frozen, trained = layer.intermediate.dense.weight, layer.output.dense.weight
    frozen.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    pairs = [(p, torch.rand(p.shape, generator=generator) > 0.5) for p in (frozen, trained)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handles = WeightMasks(pairs).attach(optimizer)
    for batch in make_batches(SHAPES):
        model(**batch).loss.backward()
        assert not trained.grad[~pairs[1][1]].any()
        optimizer.step()
        optimizer.zero_grad()
    for param, mask in pairs:
        assert not param[~mask].any() and param[mask].all()
    handles.remove()
    model(**make_batches(SHAPES)[0]).loss.backward()
    assert trained.grad[~pairs[1][1]].any()


def test_warmup_steps_leave_no_trace():
    """What CudaGraphStep does around a capture: snapshot, eager warm-up steps, restore. A
    run with that detour (at the start, fresh optimizer state, and mid-run) equals one
    without it, dropout included."""
    batches = make_batches(SHAPES)
    cpu = torch.device("cpu")
    config = TrainConfig(lr=1e-3).resolved()

    def run(detour_at: set[int]) -> dict[str, torch.Tensor]:
        model = tiny_classifier()
        optimizer, schedule = make_optimizer(model, config, 8)
        step = EagerStep(model, optimizer, StepSettings(), cpu)
        torch.manual_seed(1)
        for i, batch in enumerate(batches):
            if i in detour_at:
                saved = snapshot(model, optimizer, cpu)
                step(batches[-1])
                step(batches[0])
                restore(saved, optimizer)
            step(batch)
            schedule.step()
        return model.state_dict()

    plain, detoured = run(set()), run({0, 3})
    for name, value in plain.items():
        assert torch.equal(value, detoured[name]), name


@pytest.mark.parametrize("warmup", [0, 3])
def test_linear_schedule_equals_transformers(warmup):
    params = [torch.nn.Parameter(torch.zeros(2))]
    reference = torch.optim.SGD(params, lr=2e-5)
    scheduler = get_linear_schedule_with_warmup(reference, warmup, 10)
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=2e-5)
    schedule = LinearSchedule(ours, 2e-5, 10, warmup)
    for _ in range(12):
        assert ours.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
        assert schedule.get_last_lr() == scheduler.get_last_lr()
        reference.step()  # no gradients: a no-op, keeps torch's call-order check quiet
        scheduler.step()
        schedule.step()


def test_linear_schedule_state_and_tensor_lr():
    lr = torch.tensor(1e-3)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    schedule = LinearSchedule(optimizer, 1e-3, total_steps=4)
    schedule.step()
    assert optimizer.param_groups[0]["lr"] is lr  # filled in place, never replaced
    assert lr.item() == pytest.approx(0.75e-3)
    other = LinearSchedule(optimizer, 1e-3, total_steps=4)
    other.load_state_dict(schedule.state_dict())
    assert other.step_count == 1
    other.load_state_dict({"last_epoch": 3})  # what torch's LambdaLR saved
    assert lr.item() == pytest.approx(0.25e-3)
    with pytest.raises(ValueError, match="total_steps"):
        LinearSchedule(optimizer, 1e-3, total_steps=0)


def test_optimizer_state_round_trip_keeps_settings():
    model = tiny_classifier(dropout=0.0)
    config = TrainConfig(lr=1e-3).resolved()
    optimizer, schedule = make_optimizer(model, config, 10)
    batch = make_batches([(4, 16)])[0]
    EagerStep(model, optimizer, StepSettings(), torch.device("cpu"))(batch)
    schedule.step()
    saved = copy.deepcopy(optimizer.state_dict())
    fresh, fresh_schedule = make_optimizer(copy.deepcopy(model), config, 10)
    load_optimizer_state(fresh, saved)
    fresh_schedule.load_state_dict(schedule.state_dict())
    assert fresh.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh.param_groups[0]["fused"] is True


def test_graph_step_rejects_bad_setup():
    model = tiny_classifier()
    optimizer, _ = make_optimizer(model, TrainConfig(lr=1e-3).resolved(), 10)
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphStep(model, optimizer, StepSettings(), torch.device("cpu"))
    with pytest.raises(ValueError, match="capturable AdamW needs every parameter on a CUDA"):
        make_optimizer(model, TrainConfig(lr=1e-3).resolved(), 10, capturable=True)


def _graph_vs_eager(model_fn, precision: str, shapes=SHAPES, seed: int = 3,
                    device: str = "cuda"):
    device = torch.device(device)
    batches = make_batches(shapes, seed)
    eager, graphed = model_fn().to(device), model_fn().to(device)
    torch.manual_seed(seed)
    eager_losses = sparsebert_loop(eager, batches, 1e-3, 8, 2, device, False, precision)
    torch.manual_seed(seed)
    graph_losses = sparsebert_loop(graphed, batches, 1e-3, 8, 2, device, True, precision)
    return eager, graphed, eager_losses, graph_losses


@cuda_test
@pytest.mark.parametrize("patched", [False, True], ids=["hf", "patched"])
def test_graph_step_equals_eager_fp32(patched):
    def build():
        model = tiny_classifier(dropout=0.0)
        return sbhf.patch(model) if patched else model

    eager, graphed, eager_losses, graph_losses = _graph_vs_eager(build, "fp32")
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@cuda_test
@pytest.mark.skipif(CUDA and torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_graph_step_on_a_second_gpu_trains_as_eager():
    """On cuda:1 the graphs are captured on cuda:1 (a capture on the current device, cuda:0,
    records nothing: every replay would leave the weights as they are)."""
    eager, graphed, eager_losses, graph_losses = _graph_vs_eager(
        lambda: tiny_classifier(dropout=0.0), "fp32", device="cuda:1")
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_every_graph_capture_names_its_device(monkeypatch):
    """capture(graph, device) enters torch.cuda.graph on a stream of that device (one per
    device, reused) with the device current; the package captures through it only. (Run on
    the CPU with torch.cuda's stream, device and graph replaced by recorders.)"""
    import pathlib  # noqa: PLC0415

    import sparsebert  # noqa: PLC0415
    from sparsebert import graph_capture  # noqa: PLC0415

    events = []

    class Stream:
        def __init__(self, device):
            self.device = torch.device("cuda", device)
            events.append(("stream", str(self.device)))

    class Device(contextlib.nullcontext):
        def __init__(self, device):
            super().__init__()
            events.append(("device", str(device)))

    class Graph(contextlib.nullcontext):
        def __init__(self, graph, pool=None, stream=None):
            super().__init__()
            events.append(("graph", graph, pool, str(stream.device)))

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "graph", Graph)
    monkeypatch.setattr(graph_capture, "_STREAMS", {})
    for _ in range(2):
        with graph_capture.capture("g", torch.device("cuda:1"), pool="p"):
            events.append(("body",))
    assert events == [("stream", "cuda:1")] + [("device", "cuda:1"), ("graph", "g", "p", "cuda:1"),
                                              ("body",)] * 2
    with pytest.raises(ValueError, match="'device' must be a CUDA device"):
        graph_capture.capture_stream("cpu")
    package = pathlib.Path(sparsebert.__file__).parent
    direct = [str(path.relative_to(package)) for path in package.rglob("*.py")
              if "torch.cuda.graph(" in path.read_text()]
    assert direct == ["graph_capture.py"]


@cuda_test
def test_graph_step_with_dropout_and_bf16_matches_eager():
    """Dropout draws the same numbers inside and outside graphs; bf16 within bf16 noise."""
    _, _, eager_losses, graph_losses = _graph_vs_eager(lambda: tiny_classifier(0.1), "bf16")
    torch.testing.assert_close(graph_losses, eager_losses, rtol=2e-2, atol=2e-2)


@cuda_test
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_graph_step_with_fixed_gates_trains_as_eager(dropout):
    """CudaGraphStep(fixed_gates=True) on a patched model with masked heads and a masked MLP:
    the graphs leave them out (the eager step on a GPU computes them, times zero), train as the
    eager step does (the same dropout too), and are captured anew when set_masks writes the
    gates mid-run."""
    device = torch.device("cuda")
    first = {"head_mask": torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]),
             "mlp_mask": torch.tensor([1.0, 0.0])}
    second = {"head_mask": torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]),
              "mlp_mask": torch.tensor([1.0, 1.0])}
    batches = make_batches(SHAPES, seed=3)
    runs = {}
    for graphs in (False, True):
        model = sbhf.patch(tiny_classifier(dropout)).to(device)
        sbhf.set_masks(model, **first)
        config = TrainConfig(lr=1e-3, warmup_steps=2).resolved()
        optimizer, schedule = make_optimizer(model, config, len(batches), capturable=graphs)
        settings = StepSettings(1.0, lambda: autocast(device, "fp32", cache_enabled=not graphs))
        step = (CudaGraphStep(model, optimizer, settings, device, fixed_gates=True) if graphs
                else EagerStep(model, optimizer, settings, device))
        torch.manual_seed(3)
        losses = []
        for index, batch in enumerate(batches):
            if index == 3:
                sbhf.set_masks(model, **second)
            losses.append(float(step(batch)))
            schedule.step()
            if graphs and index == 2:
                assert len(step.graphs) == 2 and len(step.gates.buffers) == 6  # 2 layers x 3
        runs[graphs] = model, losses
    (eager, eager_losses), (graphed, graph_losses) = runs[False], runs[True]
    assert len(step.graphs) == 3  # dropped at the new masks, then the 3 shapes captured
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@cuda_test
def test_graph_step_fixed_gates_option_is_checked(monkeypatch):
    device = torch.device("cuda")
    model = tiny_classifier().to(device)
    optimizer, _ = make_optimizer(model, TrainConfig(lr=1e-3).resolved(), 10, capturable=True)
    with pytest.raises(TypeError, match="'fixed_gates' must be None or a bool"):
        CudaGraphStep(model, optimizer, StepSettings(), device, fixed_gates="yes")
    monkeypatch.setenv("SPARSEBERT_GRAPH_FIXED_GATES", "1")
    assert CudaGraphStep(model, optimizer, StepSettings(), device).gates is not None
    monkeypatch.setenv("SPARSEBERT_GRAPH_FIXED_GATES", "maybe")
    with pytest.raises(ValueError, match="SPARSEBERT_GRAPH_FIXED_GATES"):
        CudaGraphStep(model, optimizer, StepSettings(), device)
    monkeypatch.delenv("SPARSEBERT_GRAPH_FIXED_GATES")
    assert CudaGraphStep(model, optimizer, StepSettings(), device).gates is None


@cuda_test
def test_graph_step_keeps_weight_masks():
    device = torch.device("cuda")
    model = tiny_classifier(dropout=0.0).to(device)
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    mask = torch.rand(weight.shape, device=device) > 0.5
    sparsebert_loop(model, make_batches(SHAPES), 1e-2, 8, 0, device, True,
                    masks=WeightMasks([(weight, mask)]))
    assert torch.all(weight[~mask] == 0)
    assert torch.count_nonzero(weight[mask]) == mask.sum()


@cuda_test
def test_graph_step_replays_reach_an_accelerated_model():
    """A replayed step moves the parameters' version counters (the optimizer's hooks do not
    run on replay): an accelerated model rebuilds its compact weights after each step."""
    from sparsebert.speed.accelerate import accelerate  # noqa: PLC0415

    device = torch.device("cuda")
    model = sbhf.patch(tiny_classifier(dropout=0.0)).to(device)
    fast = accelerate(model)
    batch = {k: v.to(device) for k, v in make_batches(SHAPES)[0].items() if k != "labels"}
    before = fast(**batch).logits  # compact weights built from the initial parameters
    versions = [p._version for p in model.parameters()]
    sparsebert_loop(model, make_batches(SHAPES), 1e-2, 8, 0, device, True)
    assert all(p._version > v for p, v in zip(model.parameters(), versions, strict=True))
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    assert (expected - before).abs().max() > 1e-3  # training moved the logits
    torch.testing.assert_close(fast(**batch).logits, expected, rtol=1e-4, atol=1e-4)



@pytest.fixture(scope="module")
def word_model(tmp_path_factory) -> str:
    """A random 2-layer BERT with a word-level vocabulary of the synthetic SST-2 (no
    download, no model package), dropout off."""
    from transformers import BertModel  # noqa: PLC0415

    path = tmp_path_factory.mktemp("word-bert")
    tokenizer = word_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@cuda_test
def test_finetune_with_cuda_graphs_matches_eager_and_resumes(word_model, synthetic_glue, tmp_path):
    base = dict(task="sst2", model=word_model, glue_dir=synthetic_glue, epochs=2, batch_size=16,
                lr=1e-3, seed=7, device="cuda", precision="fp32", log_every=2,
                max_length=32)  # (the model's position limit is 64)
    eager = finetune(TrainConfig(**base, cuda_graphs="off"), tmp_path / "eager", progress=False)
    graphs = finetune(TrainConfig(**base, cuda_graphs="on"), tmp_path / "graphs",
                      progress=False)
    assert graphs.step == eager.step == 12
    expected = _weights(tmp_path / "eager")
    for name, value in _weights(tmp_path / "graphs").items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-4, msg=name)
    stopped = finetune(TrainConfig(**base, cuda_graphs="on", stop_after_steps=3),
                       tmp_path / "resumed", progress=False)
    assert stopped.status == "stopped"
    finetune(TrainConfig(**base, cuda_graphs="on"), tmp_path / "resumed", progress=False)
    for name, value in _weights(tmp_path / "resumed").items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-4, msg=name)


def test_cuda_graphs_option_is_checked():
    with pytest.raises(TrainError, match="--cuda-graphs .yes.: expected one of auto, on, off"):
        TrainConfig(cuda_graphs="yes").resolved()
    if not CUDA:
        with pytest.raises(TrainError, match="needs a CUDA device"):
            use_cuda_graphs(TrainConfig(cuda_graphs="on").resolved(), torch.device("cpu"))
