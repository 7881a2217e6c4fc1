"""LoRA adapters in PEFT's layout, checked against the ``peft`` package itself: adapters PEFT makes
for BAGEL (whole model or language model alone; rsLoRA, rank and alpha patterns) merge at load exactly as
PEFT merges them, and the adapters we write are read by PEFT with every tensor in place."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import bagel_engine
from bagel_engine.weights.adapters import read_adapter, save_adapter, target_modules
from bagel_engine.weights.config import ConfigError

peft = pytest.importorskip("peft")

MODEL = Path(__file__).parent / "data" / "tiny-v1" / "model"
GEN = r".*\.layers\.\d+\.(?:self_attn\.(?:q_proj_moe_gen|v_proj_moe_gen)|mlp_moe_gen\.(?:up_proj|down_proj))"


@pytest.fixture(scope="module")
def base():
    return bagel_engine.load(MODEL, device="cpu").model


def assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("options", [
    {"r": 4, "lora_alpha": 8},
    {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj_moe_gen": 3}},
], ids=["plain", "rslora-patterns"])
def test_adapters_peft_makes_for_bagel_merge_as_peft_merges_them(tmp_path, base, options):
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=GEN, init_lora_weights=False, **options)  # B != 0: a real update
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "adapter")
    theirs = model.merge_and_unload()
    ours = bagel_engine.load(MODEL, device="cpu", lora=tmp_path / "adapter").model
    assert_same_weights(ours, theirs)
    assert not torch.equal(ours.state_dict()["language_model.model.layers.0.mlp_moe_gen.down_proj.weight"],
                           base.state_dict()["language_model.model.layers.0.mlp_moe_gen.down_proj.weight"])


def test_an_adapter_made_on_the_language_model_alone_finds_its_layers(tmp_path, base):
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=GEN, init_lora_weights=False)
    lm = peft.get_peft_model(copy.deepcopy(base.language_model), config)
    lm.save_pretrained(tmp_path / "lm")
    merged_lm = lm.merge_and_unload()
    ours = bagel_engine.load(MODEL, device="cpu", lora=tmp_path / "lm").model
    assert_same_weights(ours.language_model, merged_lm)


def test_the_adapters_we_write_are_read_by_peft(tmp_path, base):
    torch.manual_seed(2)
    linears = {n: m for n, m in base.named_modules() if n.endswith(("q_proj_moe_gen", "mlp_moe_gen.up_proj"))}
    tensors = {}
    for name, m in linears.items():
        tensors[f"{name}.lora_A"] = torch.randn(3, m.in_features)
        tensors[f"{name}.lora_B"] = torch.randn(m.out_features, 3)
    save_adapter(tmp_path / "ours", tensors, rank=3, alpha=6.0, targets="gen", base_model=str(MODEL))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == target_modules(sorted(linears))
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    loaded = dict(model.named_modules())
    for name in linears:  # every tensor where PEFT looks for it, with PEFT's scale
        layer = loaded[f"base_model.model.{name}"]
        torch.testing.assert_close(layer.lora_A["default"].weight, tensors[f"{name}.lora_A"])
        torch.testing.assert_close(layer.lora_B["default"].weight, tensors[f"{name}.lora_B"])
        assert layer.scaling["default"] == pytest.approx(2.0)
    adapted = {n for n, m in loaded.items() if hasattr(m, "lora_A")}
    assert adapted == {f"base_model.model.{n}" for n in linears}  # and nothing else
    ours = bagel_engine.load(MODEL, device="cpu", lora=tmp_path / "ours").model
    assert_same_weights(ours, model.merge_and_unload())


def test_adapters_we_cannot_merge_are_refused_clearly(tmp_path, base):
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=GEN, use_dora=True)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="DoRA"):
        read_adapter(tmp_path / "dora")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="IA3 adapter"):
        read_adapter(tmp_path / "ia3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no LoRA adapter in"):
        read_adapter(tmp_path / "empty")
