"""benchmarks/mask_attention.py on one small pair: the maps are attention probabilities over the caption's tokens,
the engine's map of where the changed words look is the hooks' maps weighted by how far each token moved, the
changed words are found, and every rule is scored."""
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_changed_words_are_the_token_positions_an_edit_replaces_adds_or_drops():
    from mask_attention import changed_words
    base = "a small red circle on the left, on a plain background"
    assert changed_words(base, base.replace("red", "blue")) == ([3], [3])
    added = "a small red circle on the left and a large blue square at the top, on a plain background"
    removed, new = changed_words(base, added)
    assert removed == [] and [added.replace(",", "").split()[p - 1] for p in new] == \
        "and a large blue square at the top".split()
    assert changed_words(added, base) == (new, [])
    from mask_attention import phrase_tokens
    words = added.replace(",", "").split()
    assert [words[p - 1] for p in phrase_tokens(added, [3])] == "red circle on the left".split()
    assert [words[p - 1] for p in phrase_tokens(added, new)] == "and a large blue square at the top".split()


def test_mask_attention_collects_and_scores_one_pair(host, tmp_path):
    out = tmp_path / "attention.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mask_attention.py"), "collect", "--pairs", "1",
                           "--size", "128", "--steps", "10", "--probe-steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record, = torch.load(out)["records"]
    tokens = len(record["before"].replace(",", "").split()) + 2  # the start and end tokens around the words
    for run in ("before", "after"):
        maps = record[f"{run}_maps"].float()
        assert maps.shape[1:] == (16, 16) and maps.shape[0] >= tokens
        assert torch.allclose(maps.sum(0), torch.ones(16, 16), atol=1e-2)  # probabilities over the tokens
    for name in ("difference", "attention"):
        assert record[name].shape == (16, 16) and record[name].max() > 0
    assert record["guide"].shape == (128, 128, 3) and record["truth_grid"].any()
    hooks = sum(m / m.max() for m in ((record[f"{run}_maps"].float() * record["token_change"][:, None, None]).sum(0)
                                      for run in ("after", "before")))
    torch.testing.assert_close(record["attention"], hooks, atol=2e-3 * float(hooks.max()), rtol=0)  # the engine's
    assert record["removed"] or record["added"]
    change = record["token_change"]
    assert change.shape == (record["before_maps"].shape[0],) and change.max() > 0  # the changed word's token moved
    assert float(change[0]) == 0.0  # the start token is the same in both captions
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mask_attention.py"), "score", str(out)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert table.returncode == 0, table.stderr[-3000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and not line.startswith("| rule |")]
    assert len(rows) == 18 and "the node's rule" in table.stdout and "phrases" in table.stdout
