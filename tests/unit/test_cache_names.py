"""Cache names: a user's name is kept; an empty one is derived so that two workflows never share a cache."""
from fisedit_engine.api import cache_name_for

PROMPT_A = {"1": {"class_type": "CheckpointLoaderSimple"}, "2": {"class_type": "FISEditCacheCapture"}}
PROMPT_B = {"1": {"class_type": "CheckpointLoaderSimple"}, "2": {"class_type": "FISEditCacheCapture"},
            "3": {"class_type": "LoraLoader"}}


def test_user_name_wins():
    assert cache_name_for("  my cat  ", "2", PROMPT_A, None) == "my cat"


def test_ui_workflow_id_names_the_cache():
    a = cache_name_for("", "2", PROMPT_A, {"workflow": {"id": "0f3c9a2e-1111-2222-3333-444455556666"}})
    b = cache_name_for("", "2", PROMPT_A, {"workflow": {"id": "9a9a9a9a-1111-2222-3333-444455556666"}})
    assert a.startswith("wf-0f3c9a2e") and a.endswith("-node2") and a != b


def test_api_prompts_differ_by_graph_not_by_widget_values():
    a = cache_name_for("", "2", PROMPT_A, None)
    edited = {k: dict(v, inputs={"text": "other words"}) for k, v in PROMPT_A.items()}
    assert cache_name_for("", "2", edited, None) == a  # editing the prompt text keeps the cache
    assert cache_name_for("", "2", PROMPT_B, None) != a  # another workflow gets another cache
    assert cache_name_for("", "7", PROMPT_A, None) != a  # and so does another capture node
