"""Captions: a small grammar over the toy world, its word vocabulary, and token ids built in bulk.

    caption := clause (" and " clause)* ", on a " BACKGROUND " background"
    clause  := "a " SIZE " " COLOUR " " SHAPE " " CELL
    e.g. "a large red circle at the top left and a small blue square on the right, on a striped background"

Clauses follow the scene's slot order, so adding an object appends a clause and leaves the caption's beginning as
it was: under the text encoder's causal attention the embeddings of that unchanged prefix stay identical, which
FISEdit's attention control relies on.

Tokens are whole words (the grammar has 30); the text encoder's sequence is CLIP's layout: start token, words,
end token, padded with the end token to 77 positions. `token_ids` builds that for a whole batch of scenes on
their device; `word_ids` is the per-text path the ComfyUI tokenizer takes, and the two agree (tested).
"""
from __future__ import annotations

import re

import torch

from . import world
from .world import Scenes

MAX_TOKENS = 77
# The longest caption (three objects with four-word positions) is 1 + 3 * 9 + 5 = 33 tokens: always within the
# context, so token_ids needs no (device-synchronising) length check.
SPECIALS = ("<unk>", "<start>", "<end>")
UNK, START, END = 0, 1, 2
GRAMMAR_WORDS = ("a", "and", "on", "background", "at", "the", "top", "bottom", "left", "right", "in", "middle")
VOCAB = SPECIALS + GRAMMAR_WORDS + world.SIZES + world.COLOURS + world.SHAPES + world.BACKGROUNDS
# Words a person may type for the same meaning.
ALIASES = {"an": "a", "big": "large", "tiny": "small", "centre": "middle", "center": "middle"}


def word_index(vocab: tuple[str, ...] = VOCAB) -> dict[str, int]:
    index = {w: i for i, w in enumerate(vocab)}
    for alias, word in ALIASES.items():
        if word in index:
            index.setdefault(alias, index[word])
    return index


_INDEX = word_index()
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case words; punctuation is dropped."""
    return _WORD.findall(text.lower())


def word_ids(text: str, vocab: tuple[str, ...] = VOCAB) -> list[int]:
    """Token ids of the words of `text` (unknown words -> <unk>), without start/end tokens."""
    index = _INDEX if vocab is VOCAB else word_index(vocab)
    return [index.get(w, UNK) for w in words(text)]


# --- scenes -> text ----------------------------------------------------------------------------------------------

def clause(size: int, colour: int, shape: int, cell: int) -> str:
    return f"a {world.SIZES[size]} {world.COLOURS[colour]} {world.SHAPES[shape]} {world.CELLS[cell]}"


def captions(scenes: Scenes) -> list[str]:
    s = scenes.to("cpu")
    out = []
    for b in range(len(s)):
        parts = [clause(int(s.size[b, k]), int(s.colour[b, k]), int(s.shape[b, k]), int(s.cell[b, k]))
                 for k in range(world.MAX_OBJECTS) if s.present[b, k]]
        tail = f"on a {world.BACKGROUNDS[int(s.background[b])]} background"
        out.append(" and ".join(parts) + ", " + tail if parts else tail)
    return out


# --- text -> scene -----------------------------------------------------------------------------------------------

class CaptionError(ValueError):
    pass


def parse(text: str) -> Scenes:
    """The scene a caption describes, as a batch of one; what captions leave open (tint, stripe orientation,
    phase) is 0. Accepts the grammar above (case and punctuation free); raises CaptionError otherwise."""
    ws = words(text)
    ws = [ALIASES.get(w, w) for w in ws]
    cells = {tuple(p.split()): i for i, p in enumerate(world.CELLS)}
    objects, i = [], 0

    def expect(options, what):
        nonlocal i
        if i >= len(ws) or ws[i] not in options:
            got = ws[i] if i < len(ws) else "the end"
            raise CaptionError(f"caption {text!r}: expected {what} at word {i + 1}, got {got!r}")
        i += 1
        return options.index(ws[i - 1])

    while i < len(ws) and ws[i] != "on":  # a clause consumes its own "on the left", so "on" here starts the tail
        if objects:
            expect(("and",), "'and'")
        expect(("a",), "'a'")
        size = expect(world.SIZES, "a size")
        colour = expect(world.COLOURS, "a colour")
        shape = expect(world.SHAPES, "a shape")
        cell = next((cells[c] for c in sorted(cells, key=len, reverse=True) if tuple(ws[i:i + len(c)]) == c), None)
        if cell is None:
            raise CaptionError(f"caption {text!r}: expected a position ({', '.join(world.CELLS)}) at word {i + 1}")
        i += len(world.CELLS[cell].split())
        objects.append((size, colour, shape, cell))
    expect(("on",), "'on'")
    expect(("a",), "'a'")
    bg = expect(world.BACKGROUNDS, "a background")
    expect(("background",), "'background'")
    if i != len(ws):
        raise CaptionError(f"caption {text!r}: unexpected words after the background: {' '.join(ws[i:])!r}")
    if len(objects) > world.MAX_OBJECTS:
        raise CaptionError(f"caption {text!r}: at most {world.MAX_OBJECTS} objects")
    if len({o[3] for o in objects}) != len(objects):
        raise CaptionError(f"caption {text!r}: two objects in one cell")
    k = world.MAX_OBJECTS
    pad = [(0, 0, 0, 0)] * (k - len(objects))
    cols = list(zip(*(objects + pad)))
    scene = Scenes(
        present=torch.tensor([[j < len(objects) for j in range(k)]]),
        size=torch.tensor([cols[0]]), colour=torch.tensor([cols[1]]), shape=torch.tensor([cols[2]]),
        cell=torch.tensor([cols[3]]), background=torch.tensor([bg]), tint=torch.tensor([0]),
        orientation=torch.tensor([0]), phase=torch.zeros(1, 2))
    scene.validate()
    return scene


# --- token ids in bulk -------------------------------------------------------------------------------------------

def _cell_tokens() -> torch.Tensor:
    longest = max(len(p.split()) for p in world.CELLS)
    rows = [[_INDEX[w] for w in p.split()] + [-1] * (longest - len(p.split())) for p in world.CELLS]
    return torch.tensor(rows)


def token_ids(scenes: Scenes) -> torch.Tensor:
    """[B, 77] long on the scenes' device: <start>, the caption's words, <end>, then <end> as padding; exactly what
    the ComfyUI tokenizer makes of `captions(scenes)`."""
    device = scenes.device
    n, k = scenes.present.shape
    cells = _cell_tokens().to(device)[scenes.cell]                                     # [B, K, 4]
    const = lambda w: torch.full((n, k, 1), _INDEX[w], device=device)
    off = len(SPECIALS) + len(GRAMMAR_WORDS)
    sizes = off + scenes.size
    colours = off + len(world.SIZES) + scenes.colour
    shapes = off + len(world.SIZES) + len(world.COLOURS) + scenes.shape
    slot = torch.cat([const("and"), const("a"), sizes[..., None], colours[..., None], shapes[..., None], cells], 2)
    slot[:, 0, 0] = -1                                                                  # no "and" before the first
    slot = torch.where(scenes.present[..., None], slot, -1)
    bg = len(SPECIALS) + len(GRAMMAR_WORDS) + len(world.SIZES) + len(world.COLOURS) + len(world.SHAPES)
    tail = torch.stack([torch.full((n,), _INDEX["on"], device=device), torch.full((n,), _INDEX["a"], device=device),
                        bg + scenes.background, torch.full((n,), _INDEX["background"], device=device),
                        torch.full((n,), END, device=device)], 1)
    seq = torch.cat([torch.full((n, 1), START, device=device), slot.reshape(n, -1), tail], 1)
    valid = seq >= 0
    # compact: each valid token moves to its rank among the valid tokens; invalid ones go to a spare column
    pos = torch.where(valid, valid.cumsum(1) - 1, MAX_TOKENS)
    out = torch.full((n, MAX_TOKENS + 1), END, device=device, dtype=torch.long)
    out.scatter_(1, pos, torch.where(valid, seq, END))
    return out[:, :MAX_TOKENS]


def empty_token_ids(n: int, device=None) -> torch.Tensor:
    """The empty prompt ("" -> <start> <end> ...): what a CFG negative of "" encodes, and the caption dropout."""
    out = torch.full((n, MAX_TOKENS), END, device=device, dtype=torch.long)
    out[:, 0] = START
    return out
