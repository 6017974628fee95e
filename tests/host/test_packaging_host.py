"""ComfyUI parses a custom node's pyproject.toml when it loads it (comfy_config, pydantic-settings): ours must parse."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_host_parses_our_pyproject(host):
    from comfy_config import config_parser
    config = config_parser.extract_node_configuration(str(ROOT))
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config.project.name == expected["project"]["name"]
    assert config.project.version == expected["project"]["version"]
    assert config.project.dependencies == expected["project"]["dependencies"]
    assert config.project.license.file == "LICENSE"
    assert config.project.supported_comfyui_version == expected["tool"]["comfy"]["requires-comfyui"]
    # an accelerator or OS classifier outside the registry's list would make the host drop them all
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert config.project.supported_os == ["OS Independent"]
    assert config.tool_comfy.publisher_id == expected["tool"]["comfy"]["PublisherId"]
    assert config.tool_comfy.includes == expected["tool"]["comfy"]["includes"]


def test_the_plugin_loaded_with_it(host):
    loaded = {Path(p).resolve() for p in host.LOADED_MODULE_DIRS.values()}
    assert ROOT in loaded
    assert "FISEditSparseKSampler" in host.NODE_CLASS_MAPPINGS
