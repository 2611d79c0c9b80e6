"""docs/ARCHITECTURE.md and the import-linter contracts in pyproject.toml cannot drift apart."""

from __future__ import annotations

import re
import tomllib

from migfd.paths import repo_root


def _contract_layers() -> list[str]:
    config = tomllib.loads((repo_root() / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = [c for c in contracts if c["type"] == "layers"]
    assert len(layers) == 1, "one layers contract is the architecture"
    return [" | ".join(part.strip() for part in layer.split("|")) for layer in layers[0]["layers"]]


def _document_layer_cells() -> list[str]:
    text = (repo_root() / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"<!-- layers:.*?-->(.*?)<!-- /layers -->", text, re.S)
    assert block, "docs/ARCHITECTURE.md lost its layers block"
    out = []
    for line in block.group(1).splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = re.split(r"(?<!\\)\|", line)[1]
        out.append(" | ".join(re.findall(r"`([\w.]+)`", first_cell)))
    return out


def test_architecture_document_lists_the_contract_layers_in_order():
    assert _document_layer_cells() == _contract_layers()


def test_every_package_module_is_in_a_layer():
    layers = {name for layer in _contract_layers() for name in layer.split(" | ")}
    package = repo_root() / "migfd"
    top = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    top |= {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    assert {f"migfd.{name}" for name in top} == layers
