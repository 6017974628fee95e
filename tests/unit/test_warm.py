"""warm.py's bookkeeping: what an edit keeps for the next edit of its source is handed out only under an equal key,
closed otherwise, closed when another source's edit starts, and not kept at all with FISEDIT_KEEP_GRAPHS=0."""
import logging
import pytest
import torch

from fisedit_engine import warm


class Kept:
    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


class Source:  # what warm.py reads of a FisEditCache
    def __init__(self):
        self.kept = {}


def source():
    return Source()


def key(mask=b"\x01", store=None):
    return warm.key(source=warm.same(store), mask=mask, options=("exact", 0))


def test_an_equal_key_gets_the_kept_value_and_another_key_closes_it(caplog):
    a, store, value = source(), object(), Kept()
    warm.keep(a, "steps", key(store=store), value)
    assert warm.take(a, "steps", key(store=store)) is value and value.closed == 0
    assert warm.take(a, "steps", key(store=store)) is None  # taken out: the edit keeps it again when it ends
    warm.keep(a, "steps", key(store=store), value)
    with caplog.at_level(logging.INFO, logger="FISEdit"):
        assert warm.take(a, "steps", key(mask=b"\x02", store=store)) is None
    assert value.closed == 1 and "built for another mask" in caplog.text
    warm.keep(a, "steps", key(store=store), value)
    assert warm.take(a, "steps", key(store=object())) is None and value.closed == 2  # same() compares identity


def test_one_source_keeps_at_a_time():
    a, b = source(), source()
    first, second, third = Kept(), Kept(), Kept()
    warm.keep(a, "steps", key(), first)
    warm.keep(a, "probe", key(), second)
    assert warm.take(b, "steps", key()) is None  # b's edit starts: a's are closed before it allocates its own
    assert (first.closed, second.closed) == (1, 1) and a.kept == {}
    warm.keep(b, "steps", key(), third)
    replaced = Kept()
    warm.keep(b, "steps", key(), replaced)
    assert third.closed == 1 and warm.take(b, "steps", key()) is replaced
    warm.release(b)
    assert replaced.closed == 0  # taken out before the release: the caller owns it


def test_keeping_turned_off_closes_instead(monkeypatch):
    a, value = source(), Kept()
    warm.keep(a, "steps", key(), value)
    monkeypatch.setenv("FISEDIT_KEEP_GRAPHS", "0")
    assert warm.take(a, "steps", key()) is None and value.closed == 1
    other = Kept()
    warm.keep(a, "steps", key(), other)
    assert other.closed == 1 and a.kept == {}
    monkeypatch.setenv("FISEDIT_KEEP_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="FISEDIT_KEEP_GRAPHS='sometimes'"):
        warm.enabled()


def test_the_refit_switch(monkeypatch):
    assert warm.refit_enabled()
    monkeypatch.setenv("FISEDIT_REFIT", "0")
    assert not warm.refit_enabled()
    monkeypatch.setenv("FISEDIT_REFIT", "maybe")
    with pytest.raises(ValueError, match="FISEDIT_REFIT='maybe': set 1 to let an edit with another mask"):
        warm.refit_enabled()


def test_the_weights_key_follows_addresses_and_in_place_changes():
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3))
    before = warm.weights_key(module)
    assert warm.weights_key(module) == before
    with torch.no_grad():
        module[0].weight.mul_(1.0)  # same values, same address, but written: a kept copy of it may be stale
    assert warm.weights_key(module) != before
    now = warm.weights_key(module)
    module[1].weight = torch.nn.Parameter(module[1].weight.detach().clone())  # what a reload or a LoRA patch does
    assert warm.weights_key(module) != now


def test_a_kept_graph_whose_weights_moved_is_let_go_at_its_first_call_in_a_run(caplog):
    """graphs.StepGraph.check_weights: the first call of each run compares the weights with the capture's; a graph
    whose weights moved (ComfyUI reloaded or patched the model between edits) is let go, to be captured anew."""
    from fisedit_engine.graphs import StepGraph
    module = torch.nn.Linear(2, 2)
    graph = StepGraph("cpu")
    graph.check_weights(module)
    graph.graph = "captured"  # what a capture leaves (captures need CUDA)
    graph.restart()
    graph.check_weights(module)
    assert graph.graph == "captured" and graph.runs == 2
    module.weight = torch.nn.Parameter(module.weight.detach().clone())
    graph.check_weights(module)  # not the first call of the run: not checked again
    assert graph.graph == "captured"
    graph.restart()
    with caplog.at_level(logging.INFO, logger="FISEdit"):
        graph.check_weights(module)
    assert graph.graph is None and graph.runs == 1 and graph.captures_next()
    assert "weights moved since the kept step graph was captured" in caplog.text
