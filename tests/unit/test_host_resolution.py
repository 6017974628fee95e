"""Which ComfyUI the harness boots: COMFYUI_PATH, else the ComfyUI this checkout sits in, else .comfyui/."""
import comfy_host


def test_comfyui_path_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    assert comfy_host.resolve_comfyui_path() == tmp_path.resolve()


def test_a_checkout_inside_custom_nodes_uses_that_comfyui(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "comfy" / "model_patcher.py").write_text("")
    checkout = comfy / "custom_nodes" / "comfyui-fisedit"
    checkout.mkdir(parents=True)
    monkeypatch.setattr(comfy_host, "REPO_ROOT", checkout)
    assert comfy_host.resolve_comfyui_path() == comfy


def test_otherwise_the_pinned_host(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfy_host, "REPO_ROOT", tmp_path / "checkout")
    assert comfy_host.resolve_comfyui_path() == tmp_path / "checkout" / ".comfyui"
