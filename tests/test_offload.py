"""Weight offload (``load(offload="model" | "layer")``): on the CPU the hooks run the same copy path
as on a GPU (real copies in and out of the layers), so results must equal those without offload and
the bookkeeping (what is on the device, when) must follow the schedule."""

from __future__ import annotations

import pytest
import torch

import bagel_engine
from bagel_engine.weights.offload import EXPERT_MODULES, apply_offload, move_param, remove_offload
from golden import MODEL_DIR, cases, inputs

MODES = ("model", "layer")


@pytest.fixture(scope="module")
def ref():
    return bagel_engine.load(MODEL_DIR, device="cpu")


@pytest.fixture(scope="module", params=MODES)
def offloaded(request):
    return request.param, bagel_engine.load(MODEL_DIR, device="cpu", offload=request.param)


def _group_bytes(pipe) -> int:
    return pipe.model.offloader.groups[0]["und"].nbytes


@pytest.mark.parametrize("name", ["text2img", "img2img", "think_text2img", "img2text", "text2text"])
def test_offload_equals_no_offload(ref, offloaded, name):
    mode, pipe = offloaded
    c = cases()[name]
    a = ref.interleave(inputs(name), seed=c.get("seed", 0), **c["params"])
    b = pipe.interleave(inputs(name), seed=c.get("seed", 0), **c["params"])
    assert a.text == b.text
    if a.latents is not None:
        assert torch.equal(a.latents, b.latents), mode
        assert a.image.tobytes() == b.image.tobytes()


def test_layer_mode_streams_at_most_two_layers(ref):
    pipe = bagel_engine.load(MODEL_DIR, device="cpu", offload="layer")
    off = pipe.model.offloader
    pipe.generate("a red circle", height=32, width=32, seed=0, num_timesteps=4)
    s = off.stats
    assert s.forwards >= 3 and s.prefetches > 0 and s.evictions > 0 and s.swaps == 0
    assert s.peak_device_bytes <= 2 * 2 * _group_bytes(pipe)  # this layer and the next, both experts
    assert s.experts_used["gen"] > 0 and s.experts_used["und"] > 0
    # after a text-only forward the generation expert is no longer predicted: only und streams
    before = dict(s.experts_used)
    loads = s.loads
    pipe.chat("hello", max_new_tokens=4)
    assert s.experts_used["gen"] == before["gen"]
    n_layers = len(pipe.model.language_model.model.layers)
    assert s.loads - loads <= (s.forwards) * n_layers + 2


def test_model_mode_keeps_the_used_expert_resident():
    pipe = bagel_engine.load(MODEL_DIR, device="cpu", offload="model")
    off = pipe.model.offloader
    layers = pipe.model.language_model.model.layers
    n = len(layers)
    pipe.generate("a red circle", height=32, width=32, seed=0, num_timesteps=6)
    assert off.resident == "gen"  # denoising: the generation expert stays, the understanding one streams
    assert all(off.groups[i]["gen"].state == "on" for i in range(n))
    assert off.stats.peak_device_bytes <= (n + 2) * _group_bytes(pipe)
    gen_loads = off.stats.loads
    pipe.generate("a red circle", height=32, width=32, seed=0, num_timesteps=6)
    assert off.stats.swaps >= 1
    pipe.chat("hello there", max_new_tokens=6)  # text decoding: the understanding expert becomes resident
    assert off.resident == "und"
    assert all(off.groups[i]["und"].state == "on" for i in range(n))
    assert all(off.groups[i]["gen"].state == "off" for i in range(n))
    assert off.stats.loads > gen_loads
    # a streamed weight that is off the device is its CPU master again
    g = off.groups[0]["gen"]
    for (module, name), master in zip(g.slots, g.masters):
        assert module._parameters[name] is master


def test_small_modules_stay_and_remove_restores(ref):
    pipe = bagel_engine.load(MODEL_DIR, device="cpu", offload="layer")
    layer = pipe.model.language_model.model.layers[0]
    norm = layer.input_layernorm.weight
    kw = dict(height=32, width=32, seed=4, num_timesteps=4)
    a = pipe.generate("a blue square", **kw)
    assert layer.input_layernorm.weight is norm  # norms are not streamed
    remove_offload(pipe.model)
    assert pipe.model.offloader is None
    assert all(not m._forward_pre_hooks for m in pipe.model.modules())
    b = pipe.generate("a blue square", **kw)
    assert torch.equal(a.latents, b.latents)
    assert torch.equal(b.latents, ref.generate("a blue square", **kw).latents)


def test_expert_module_table_matches_the_model():
    model = bagel_engine.load(MODEL_DIR, device="meta").model
    layer = model.language_model.model.layers[0]
    streamed = {id(p) for path in EXPERT_MODULES for p in layer.get_submodule(path).parameters()}
    linears = {id(m.weight) for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    assert linears <= streamed  # every linear of the layer streams; the norms do not
    assert not any(id(p) in streamed for n, p in layer.named_parameters() if "norm" in n)


def test_bad_mode_and_device():
    model = bagel_engine.load(MODEL_DIR, device="cpu").model
    with pytest.raises(ValueError, match="unknown offload"):
        apply_offload(model, "expert", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        apply_offload(model, "layer", torch.device("meta"))
    with pytest.raises(ValueError, match="unknown offload"):
        bagel_engine.load(MODEL_DIR, offload="disk")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            apply_offload(model, "model", torch.device("cuda"))
        assert getattr(model, "offloader", None) is None


def test_move_param_copies_on_request():
    p = torch.nn.Parameter(torch.randn(3, 4), requires_grad=False)
    q = move_param(p, torch.device("cpu"), copy_always=True)
    assert isinstance(q, torch.nn.Parameter) and not q.requires_grad
    assert q.data_ptr() != p.data_ptr() and torch.equal(q, p)
    assert move_param(p, torch.device("cpu")).data_ptr() == p.data_ptr()


def test_masters_replaced_by_pinned_copies_stay_streamed(ref, monkeypatch):
    """On a GPU the CPU masters are replaced by pinned copies before the rest moves to the device;
    emulated here (pinning needs CUDA) with a copying stand-in."""
    from bagel_engine.weights import offload

    pinned = []

    def fake_pin(p):
        q = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        pinned.append(q)
        return q

    monkeypatch.setattr(offload, "_pin", fake_pin)
    monkeypatch.setattr(offload.Offloader, "PIN_ON_CPU", True)
    pipe = bagel_engine.load(MODEL_DIR, device="cpu", offload="layer")
    off = pipe.model.offloader
    masters = {id(p) for groups in off.groups for g in groups.values() for p in g.masters}
    assert masters == {id(p) for p in pinned}
    kw = dict(height=32, width=32, seed=7, num_timesteps=4)
    assert torch.equal(pipe.generate("a tree", **kw).latents, ref.generate("a tree", **kw).latents)
