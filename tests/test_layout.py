"""The repository stands alone and its modules are layered: model, records, sandbox, world -> hf -> data ->
verifiers -> capabilities -> tasks -> distributed -> common -> judges -> evaluate -> stage scripts -> polish
(which runs prefopt's and copg's phases). A module imports only from layers below its own, so there are no
cycles and any import order works."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [{"model", "records", "sandbox", "world"}, {"hf"}, {"data"}, {"verifiers"}, {"capabilities"},
          {"tasks"}, {"distributed"}, {"common"}, {"judges"}, {"evaluate"},
          {"pretrain", "sft", "reward", "prefopt", "copg", "merge", "bench"}, {"polish"}]
LAYER = {module: i for i, layer in enumerate(LAYERS) for module in layer}


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYER)


def test_every_module_has_a_layer():
    assert {p.stem for p in ROOT.glob("*.py")} == set(LAYER)


@pytest.mark.parametrize("module", sorted(LAYER))
def test_a_module_imports_only_from_lower_layers(module):
    imported = project_imports(ROOT / f"{module}.py") - {module}
    assert not [name for name in imported if LAYER[name] >= LAYER[module]], \
        f"{module} imports {sorted(imported)}"


def test_stage_scripts_import_in_any_order():
    for order in (["evaluate", "prefopt", "copg", "sft"], ["sft", "copg", "prefopt", "evaluate"],
                  ["copg", "sft", "evaluate", "prefopt"]):
        subprocess.run([sys.executable, "-c", f"import {', '.join(order)}"], cwd=ROOT, check=True)


def test_no_file_cites_documents_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    # split: this file is read too
    outside = ("DESIGN" + ".md", "DESIGN" + " §", "NOTES" + ".md", "../" + "shared")
    for name in tracked.split():
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        assert not [o for o in outside if o in text], f"{name} cites {[o for o in outside if o in text]}"


def test_the_stage_defaults_chain_as_the_readme_prints_them():
    import copg, polish, prefopt, pretrain, reward, sft  # noqa: E401

    instruct_sft = sft.parse_args(["--capability", "instruct"])
    assert instruct_sft.init == pretrain.parse_args([]).out == "runs/tiny/pretrain"
    assert reward.parse_args([]).init == instruct_sft.out == "runs/tiny/instruct-sft"
    instruct = prefopt.parse_args(["--capability", "instruct"])
    assert (instruct.init, instruct.out) == (instruct_sft.out, "runs/tiny/instruct")
    for capability in ("rag", "multilingual", "code", "math", "longctx", "safety"):
        expert = sft.parse_args(["--capability", capability])
        assert (expert.init, expert.out) == (instruct.out, f"runs/tiny/sft-{capability}")
    for stage, capability in ((copg, "math"), (copg, "code"), (prefopt, "safety"), (prefopt, "multilingual")):
        rl = stage.parse_args(["--capability", capability])
        assert (rl.init, rl.out) == ("runs/tiny/sft-soup", f"runs/tiny/rl-{capability}")
    polishing = polish.parse_args([])
    assert (polishing.init, polishing.out) == ("runs/tiny/polish-bon", "runs/tiny/polished")
    assert polishing.reference == instruct.out
