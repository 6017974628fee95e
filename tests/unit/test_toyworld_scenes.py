"""The toy world's generator: determinism, exact edit regions, the caption grammar, and the judge on clean renders.
Pure torch; no ComfyUI."""
import pytest
import torch

from toyworld import captions, edits, judge, render, world


def _fields_equal(a: world.Scenes, b: world.Scenes) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in
               ("present", "shape", "colour", "size", "cell", "background", "tint", "orientation", "phase"))


def test_same_seed_same_scenes_and_images_different_seed_different():
    a, b, c = (world.sample_scenes(12, seed=s) for s in (7, 7, 8))
    assert _fields_equal(a, b) and not _fields_equal(a, c)
    ia, ma = render.render(a, 128)
    ib, mb = render.render(b, 128)
    assert torch.equal(ia, ib) and torch.equal(ma, mb)
    assert not torch.equal(ia, render.render(c, 128)[0])
    e1, e2 = edits.sample_edits(10, seed=3), edits.sample_edits(10, seed=3)
    assert _fields_equal(e1.after, e2.after) and torch.equal(e1.kind, e2.kind)


def test_scenes_are_well_formed_and_objects_never_overlap():
    s = world.sample_scenes(200, seed=1)
    s.validate()
    assert set(s.count.tolist()) == {1, 2, 3}
    masks = render.object_masks(s, 128)
    assert masks.sum(dim=1).max() <= 1                         # no pixel belongs to two objects
    assert (masks.flatten(2).any(2) == s.present).all()        # every present object has pixels, absent ones none
    with pytest.raises(ValueError, match="share a cell"):
        s[0].replace(present=torch.tensor([[True, True, False]]), cell=torch.tensor([[4, 4, 0]])).validate()


def test_an_edits_changed_region_is_exactly_where_the_two_renders_differ():
    e = edits.sample_edits(60, seed=11)
    assert sorted(set(e.kind.tolist())) == list(range(len(edits.EDIT_KINDS)))
    before, _ = render.render(e.before, 128)
    after, _ = render.render(e.after, 128)
    affected, changed = e.regions(128)
    differ = (before != after).any(dim=1)
    assert torch.equal(changed, differ)
    assert not (changed & ~affected).any()
    assert changed.flatten(1).any(1).all()                     # every edit changes something
    # a colour edit, an add or a remove changes its whole footprint; shape and size edits keep the overlap
    full = (e.kind == edits.COLOUR) | (e.kind == edits.ADD) | (e.kind == edits.REMOVE)
    assert torch.equal(changed[full], affected[full])
    assert (affected & ~changed)[~full].flatten(1).any(1).all()


def test_an_edit_touches_one_object_and_nothing_else():
    e = edits.sample_edits(40, seed=5)
    b, a = e.before, e.after
    assert torch.equal(b.background, a.background) and torch.equal(b.tint, a.tint) and torch.equal(b.phase, a.phase)
    count_change = a.count - b.count
    assert torch.equal(count_change, (e.kind == edits.ADD).long() - (e.kind == edits.REMOVE).long())
    for i in range(len(e)):
        old = {tuple(x) for x, p in zip(torch.stack([b.cell[i], b.colour[i], b.shape[i], b.size[i]], 1).tolist(),
                                        b.present[i].tolist()) if p}
        new = {tuple(x) for x, p in zip(torch.stack([a.cell[i], a.colour[i], a.shape[i], a.size[i]], 1).tolist(),
                                        a.present[i].tolist()) if p}
        assert len(old ^ new) == (1 if e.kind[i] in (edits.ADD, edits.REMOVE) else 2)


def test_an_added_object_takes_a_free_cell():
    """Also where an object stands in the top left cell, the cell that absent slots hold (a scatter of the slots'
    presence once let an absent slot free that cell, and the new object overlapped the old)."""
    e = edits.sample_edits(300, seed=0, kinds=("add",))
    assert (e.before.present & (e.before.cell == 0)).any()
    e.after.validate()  # raises where two present objects share a cell
    masks = render.object_masks(e.after, 64)
    assert masks.sum(dim=1).max() <= 1


def test_adding_an_object_keeps_the_caption_prefix():
    e = edits.sample_edits(10, seed=2, kinds=("add",))
    for old, new in zip(*e.captions()):
        head = old.split(", on a ")[0]
        assert new.startswith(head + " and a ")


def test_caption_round_trip_and_tokens():
    s = world.sample_scenes(50, seed=4)
    texts = captions.captions(s)
    assert any(" and " in t for t in texts)
    ids = captions.token_ids(s)
    assert ids.shape == (50, captions.MAX_TOKENS)
    for i, text in enumerate(texts):
        parsed = captions.parse(text)
        assert captions.captions(parsed) == [text]
        k = int(s.count[i])
        for field in ("shape", "colour", "size", "cell"):
            assert torch.equal(getattr(parsed, field)[0, :k], getattr(s, field)[i, :k])
        assert int(parsed.background) == int(s.background[i])
        words = [captions.START] + captions.word_ids(text) + [captions.END]
        assert ids[i, :len(words)].tolist() == words
        assert (ids[i, len(words):] == captions.END).all()     # padded with the end token, as CLIP is
    assert captions.UNK not in ids


def test_parse_is_lenient_about_case_and_aliases_and_rejects_other_text():
    s = captions.parse("A BIG Red Circle in the centre, on a Striped background.")
    assert captions.captions(s) == ["a large red circle in the middle, on a striped background"]
    with pytest.raises(captions.CaptionError, match="colour"):
        captions.parse("a large pink circle in the middle, on a plain background")
    with pytest.raises(captions.CaptionError, match="position"):
        captions.parse("a large red circle somewhere, on a plain background")
    with pytest.raises(captions.CaptionError, match="one cell"):
        captions.parse("a small red circle on the left and a large blue square on the left, on a plain background")
    assert captions.word_ids("a zebra") == [captions.word_index()["a"], captions.UNK]


def test_judge_reads_every_cell_of_clean_renders_and_decides_edits():
    s = world.sample_scenes(16, seed=9)
    images, _ = render.render(s, 128)
    assert judge.objects_correct(images, s).all()
    empty = torch.tensor([next(c for c in range(9) if c not in s.cell[i][s.present[i]].tolist())
                          for i in range(len(s))])
    assert not judge.read_cells(images, empty).present.any()
    e = edits.sample_edits(15, seed=13)
    before, _ = render.render(e.before, 128)
    after, _ = render.render(e.after, 128)
    assert judge.edit_success(after, e).all()
    assert not judge.edit_success(before, e).any()             # the unedited image never passes
    noisy = (after + 0.04 * torch.randn(after.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert judge.edit_success(noisy, e).all()
