"""pyproject.toml: the registry's required fields, dependencies equal to requirements.txt, the license file."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_dependencies_mirror_requirements_txt():
    # ComfyUI-Manager installs requirements.txt, the registry reads [project].dependencies: they must not drift.
    deps = _pyproject()["project"]["dependencies"]
    assert deps == _requirements()
    assert all(Requirement(d).name for d in deps)


def test_project_fields_the_registry_requires():
    project = _pyproject()["project"]
    # registry node id: < 100 characters, alphanumerics and - _ . only, no run of specials, no leading digit/special,
    # and (its best practice) no "ComfyUI" in it
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", project["name"])
    assert len(project["name"]) < 100 and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"].strip()
    assert project["license"] == {"file": "LICENSE"}
    assert SpecifierSet(project["requires-python"]).contains("3.10")
    assert project["urls"]["Repository"].startswith("https://")


def test_tool_comfy_section():
    comfy = _pyproject()["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # the icon is served from the repository: the file it names must be in it
    icon = comfy["Icon"]
    repo = _pyproject()["project"]["urls"]["Repository"].replace("https://github.com/", "")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix) and (ROOT / icon[len(prefix):]).is_file()
    for folder in comfy["includes"]:
        assert (ROOT / folder).is_dir(), folder
    spec = SpecifierSet(comfy["requires-comfyui"])
    assert Version("0.3.75") in spec  # the pinned, tested host
    assert Version("0.3.74") not in spec


def test_license_is_the_gpl3_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE")
    assert "Version 3, 29 June 2007" in text and "END OF TERMS AND CONDITIONS" in text
