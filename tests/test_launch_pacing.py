"""train.cpu_lead_layers (tasks/train/launch_pacing.py): a mark at each decoder layer's forward and backward, a wait
for the oldest when the CPU is more than the lead ahead, and no change to the math. CUDA events cannot exist on this
machine: the pacer's events are stand-ins that say whether the GPU has reached them."""

from __future__ import annotations

import itertools

import torch

from tasks.common.config import with_overrides
from tasks.train.compilation import compile_layers, compiled_graphs, decoder_layers, graph_breaks
from tasks.train.launch_pacing import LaunchPacer, pace, pace_layers
from tests.test_compilation import tiny_peft_llama


def stand_in_events(log: list[str], reached: bool = False):
    """A factory of stand-ins for CUDA events as the pacer uses them (recorded, queried, waited for), each writing
    what happens to it into `log`; `reached`: whether the GPU has got to them already."""
    count = itertools.count()

    class StandInEvent:
        def __init__(self):
            self.name, self.reached = f"e{next(count)}", reached

        def record(self):
            log.append(self.name)

        def query(self):
            return self.reached

        def synchronize(self):
            log.append(f"wait {self.name}")
            self.reached = True

    return StandInEvent


def test_the_cpu_waits_for_the_oldest_mark_once_it_is_more_than_the_lead_ahead():
    log = []
    pacer = LaunchPacer(2, make_event=stand_in_events(log))
    for _ in range(4):
        pacer.mark()
    # two marks may be outstanding: the third waits for the first, the fourth for the second
    assert log == ["e0", "e1", "e2", "wait e0", "e3", "wait e1"]
    assert pacer.report() == {"lead_layers": 2, "marks": 4, "waits": 2}


def test_no_wait_when_the_gpu_has_already_reached_the_oldest_mark():
    log = []
    pacer = LaunchPacer(1, make_event=stand_in_events(log, reached=True))
    for _ in range(3):
        pacer.mark()
    assert log == ["e0", "e1", "e2"]
    assert pacer.report()["waits"] == 0 and len(pacer.outstanding) == 1


def test_no_pacing_unless_asked_for_and_on_cuda(params):
    model = tiny_peft_llama(layers=2)
    assert params.train.cpu_lead_layers == 0 and pace(params, model) is None  # unbounded by default
    assert pace(with_overrides(params, **{"train.cpu_lead_layers": 8}), model) is None  # CUDA only


def _step(model, seed: int = 0):
    torch.manual_seed(seed)  # the same LoRA dropout masks with and without pacing
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def test_paced_layers_mark_each_forward_and_backward_and_give_the_same_loss_and_gradients():
    model = tiny_peft_llama(layers=4)
    loss, grads = _step(model)
    pacer = LaunchPacer(2, make_event=stand_in_events([]))
    assert pace_layers(decoder_layers(model), pacer) == 4
    paced_loss, paced_grads = _step(model)
    assert pacer.marks == 8  # four layers' forward and four layers' backward
    assert pacer.waits == 6  # the stand-in GPU never gets anywhere: every mark beyond the second waits
    assert torch.equal(loss, paced_loss) and grads.keys() == paced_grads.keys()
    assert all(torch.equal(grads[n], paced_grads[n]) for n in grads)
    # no gradient, no backward mark (evaluation)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert pacer.marks == 12


def test_a_compiled_layer_is_paced_outside_the_graph():
    """The wrapper goes around nn.Module.compile's compiled call: no graph break, still one graph for every layer."""
    import torch._dynamo.utils

    torch._dynamo.reset()
    model = tiny_peft_llama(layers=4)
    compile_layers(model, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    pacer = LaunchPacer(8, make_event=stand_in_events([]))
    pace_layers(decoder_layers(model), pacer)
    _step(model)
    assert pacer.marks == 8 and compiled_graphs() == 1 and graph_breaks() == 0
