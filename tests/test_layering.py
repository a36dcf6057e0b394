"""The architecture in the folder layout: imports run one way (data -> curriculum -> model -> engine -> cli)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mae_curriculum"
# a layer may import only from the layers listed for it (and from itself)
ALLOWED = {
    "data": {"data"},
    "curriculum": {"curriculum"},
    "models": {"models"},
    "engine": {"engine", "models", "curriculum", "data", "config", "config_finetune"},
    "cli": {"cli", "engine", "config", "config_finetune", "data"},
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mae_curriculum"):
            parts = node.module.split(".")
            names.add(parts[1] if len(parts) > 1 else node.names[0].name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mae_curriculum."):
                    names.add(a.name.split(".")[1])
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_run_one_way(layer):
    bad = {}
    for f in sorted((PKG / layer).glob("*.py")):
        wrong = imports_of(f) - ALLOWED[layer]
        if wrong:
            bad[f.name] = sorted(wrong)
    assert bad == {}, f"{layer}/ imports layers above it: {bad}"


def test_models_are_pure_nn_modules():
    """models/ holds nn.Module code: no config errors, no checkpoint reading, no optimizers."""
    for f in (PKG / "models").glob("*.py"):
        text = f.read_text()
        for needle in ("ConfigError", "torch.load", "torch.optim", "safetensors"):
            assert needle not in text, f"models/{f.name} uses {needle}"


def test_the_training_loops_read_top_to_bottom():
    """The loop bodies and the MAE step stay short (issue 12: each <= 60 lines)."""
    from mae_curriculum.engine import finetune, pretrain

    for cls, names in ((pretrain.PretrainRun, ("run", "run_epoch", "train_step")),
                       (finetune.FinetuneRun, ("run", "run_epoch", "train_step"))):
        for name in names:
            fn = getattr(cls, name)
            lines = fn.__code__.co_lines()
            span = max(e for _, _, e in lines if e) - fn.__code__.co_firstlineno + 1
            assert span <= 60, f"{cls.__name__}.{name} is {span} lines"
