"""Two workflows with their own cache names, queued alternately in one ComfyUI process (ComfyUI's executor, its
default output cache, one prompt at a time as a server's queue runs them), give exactly what each gives run alone.

With the default cache, alternating prompts re-run each other's nodes, so every prompt captures, seals and edits
again while the other workflow's caches sit in the same registry: cross-talk through cache names, the registry or
state left on the shared checkpoint MODEL would change a result."""
import comfy_host
import reliability

PROMPTS = 20
# A: a user-box edit; B: another seed, box, and an auto+user mask (probe steps). The texts are shared so that
# ComfyUI keeps their encodings between prompts (the CPU time goes to capture and edit, what is under test).
WORKFLOWS = {
    "A": dict(cache_name="concurrent-A", seed=42, text="a red cube", edited_text="a blue cube", steps=3),
    "B": dict(cache_name="concurrent-B", seed=7, text="a red cube", edited_text="a blue cube", steps=3,
              box=(8, 64, 56, 48), mask_mode="auto+user"),
}


def results(run) -> dict:
    """What a workflow produced: the generation's LATENT and the edited LATENT."""
    return {"original": run.outputs["6"][0][0]["samples"], "edited": run.outputs["15"][0][0]["samples"]}


def test_alternating_workflows_give_what_each_gives_alone(checkpoints):
    from fisedit_engine.registry import registry
    prompts = {k: reliability.edit_workflow(**v) for k, v in WORKFLOWS.items()}
    alone = {}
    for key, prompt in prompts.items():
        alone[key] = results(comfy_host.run_prompt(prompt, f"alone-{key}", executor=comfy_host.new_executor()))
        registry().remove(WORKFLOWS[key]["cache_name"])  # the queued runs start without it
    assert not alone["A"]["original"].equal(alone["B"]["original"])

    server = comfy_host.new_executor()
    for i in range(PROMPTS):
        key = "AB"[i % 2]
        got = results(comfy_host.run_prompt(prompts[key], f"queued-{i}", executor=server))
        for what in ("original", "edited"):
            assert got[what].equal(alone[key][what]), f"prompt {i} (workflow {key}): the {what} latent differs"
    for v in WORKFLOWS.values():  # each name holds its own workflow's generation
        assert registry().get(v["cache_name"]).settings.seed == v["seed"]
    reliability.assert_registry_consistent()
