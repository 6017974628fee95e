"""Whether the cross-attention maps of the words an edit changes locate the edit, on the toy world's model: how the
node's second mask signal (fisedit_engine/word_attention.py) was chosen.

    python benchmarks/mask_attention.py collect --pairs 100 --out A.pt        (CPU: about 6 s a pair)
    python benchmarks/mask_attention.py score A.pt [B.pt ...]

The probe's difference map alone reached 0.7 IoU neither on shape changes nor on added objects, and neither did its
best threshold per pair (an oracle): another signal was needed. Prompt-to-prompt editing locates a word by its
cross-attention map. `collect` generates toy-world edit pairs (`sample_edits(--pairs, --seed)`, with
benchmarks/edit_quality.py's seeds and settings), probes each with the node's attention control, and records the
node's own inputs to its cut (the probe's difference map, the image whose edges the cut follows, the engine's
attention map) and, from forward hooks, each caption token's cross-attention map averaged over heads, layers
(carried up to the latent grid) and the first `--probe-steps` steps: of the edited caption in the probe and of the
original caption in the captured run. `score` prints, per edit kind, how much more attention the changed words
give the true region than the rest (median ratio of means; also for each changed word's phrase, the words after it
up to the next object or the background, whose embeddings the causal text encoder changes with it), and mask rules
against the truth on the latent grid (benchmarks/mask_variants.py's table), all cut as the node cuts: the
difference alone (the rule before word_attention.py), the node's rule, the attention alone, the difference times
attention maps of several kinds and powers (every token's weighted by how far its embedding moved, which needs no
words, of the probe, the original run or both; the changed words' or their phrases', which need them), and oracle
cuts.
"""
from __future__ import annotations

import argparse
import difflib
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]


def phrase_tokens(caption: str, positions: list[int]) -> list[int]:
    """Token positions of each changed word and the words after it in its phrase (up to the next "and" or the
    background's "on a"): the text encoder is causal, so those tokens' embeddings change with the word, and in the
    toy grammar the phrase ends with where its object is ("... at the top left")."""
    words = caption.replace(",", "").split()
    out = set()
    for p in positions:
        i = p - 1
        while i < len(words) and not (i > p - 1 and words[i] == "and") and not (
                words[i] == "on" and i + 1 < len(words) and words[i + 1] == "a"):
            out.add(i + 1)
            i += 1
    return sorted(out)


def changed_words(before: str, after: str) -> tuple[list[int], list[int]]:
    """Token positions (1 + word index: the start token comes first) of the words `after` replaced or dropped from
    `before`, and of the words it replaced or added."""
    old, new = before.replace(",", "").split(), after.replace(",", "").split()
    removed, added = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if tag != "equal":
            removed += [1 + i for i in range(i1, i2)]
            added += [1 + j for j in range(j1, j2)]
    return removed, added


class AttentionMaps:
    """Forward hooks on every cross-attention (`attn2`) of a UNet: while `active`, the positive branch's attention
    probabilities per token, averaged over heads, carried up to `side` x `side` and summed over calls."""

    def __init__(self, unet, side: int):
        self.side, self.total, self.calls, self.active = side, None, 0, False
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for name, m in unet.named_modules()
                        if name.endswith("attn2")]

    def start(self):
        self.total, self.calls, self.active = None, 0, True

    def mean(self):
        self.active = False
        return self.total / max(self.calls, 1)

    def _hook(self, m, args, kwargs, output):
        import torch
        import torch.nn.functional as F
        if not self.active:
            return
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        chunks = list(kwargs.get("transformer_options", {}).get("cond_or_uncond", [0]))
        rows = x.shape[0] // len(chunks)
        first = chunks.index(0) * rows if 0 in chunks else 0  # ComfyUI's 0: the positive (cond) branch
        q = F.linear(x[first:first + 1].float(), m.to_q.weight.float())
        k = F.linear(context[first:first + 1].float(), m.to_k.weight.float())
        d = q.shape[-1] // m.heads
        q, k = (t.view(1, -1, m.heads, d).transpose(1, 2) for t in (q, k))
        probs = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1).mean(1)[0]  # [positions, tokens]
        level = int(round(probs.shape[0] ** 0.5))
        maps = F.interpolate(probs.T.reshape(-1, 1, level, level), size=(self.side, self.side), mode="bilinear",
                             align_corners=False)[:, 0]
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1


def collect(a) -> None:
    import comfy_host
    import torch
    nodes = comfy_host.boot(work_dir=Path(tempfile.mkdtemp(prefix="fisedit-mask-attention-")))
    from edit_quality import _on_latent_grid, all_edits_slice
    from fisedit_engine import api, registry
    from fisedit_engine.probe import run_probe
    from mask_signals import captured_original
    from toyworld import comfy_models, models
    from toyworld import edits as edits_mod
    model, clip, vae, _ = comfy_models.load(models.weight_sets(ROOT / "toyworld" / "weights")["toyworld"])
    encode = nodes.CLIPTextEncode()
    unet = model.model.diffusion_model
    maps = AttentionMaps(unet, a.size // 8)
    calls = {"n": 0}

    def count(module, args):  # the maps cover the first --probe-steps model calls (steps) of either run
        calls["n"] += 1
        if calls["n"] > a.probe_steps:
            maps.active = False
    counter = unet.register_forward_pre_hook(count)
    edits = edits_mod.sample_edits(a.pairs, seed=a.seed)
    records = []
    for i in range(a.pairs):
        edit = all_edits_slice(edits, i)
        before, after = edit.captions()[0][0], edit.captions()[1][0]
        with torch.inference_mode():
            before_cond, after_cond = encode.encode(clip, before)[0], encode.encode(clip, after)[0]
            calls["n"] = 0
            maps.start()
            handle, out = captured_original(model, clip, encode, before, a.seed * 100_003 + i, a,
                                            f"mask-attention-{i}")
            before_maps = maps.mean()
            source = handle.get()
            calls["n"] = 0
            maps.start()
            probe, _ = run_probe(model, source, after_cond, a.probe_steps, attention_control_on=True,
                                 control_steps=api.CONTROL_STEPS)  # as the node runs it
            after_maps = maps.mean()
            guide = api.edge_guide(vae, vae.decode(out), probe)[0]
        removed, added = changed_words(before, after)
        records.append({
            "pair": i, "kind": edits_mod.EDIT_KINDS[int(edit.kind[0])], "before": before, "after": after,
            # what the node's mask is cut from: the probe's difference map and the image whose edges the cut follows
            "difference": probe.difference[0].float(), "guide": guide.half(),
            "attention": probe.attention[0],  # the engine's map of where the changed words look (word_attention)
            "before_maps": before_maps.half(), "after_maps": after_maps.half(), "removed": removed, "added": added,
            # per token position, how far the edited caption's embedding moved: needs no words (the node gets only
            # CONDITIONING), and the causal encoder moves the changed word's phrase with it
            "token_change": (after_cond[0][0][0].float() - before_cond[0][0][0].float()).norm(dim=-1),
            "truth_grid": _on_latent_grid(edit.regions(a.size)[0][0])})
        registry.registry().clear()
        print(f"pair {i} {records[-1]['kind']}: removed {removed}, added {added}", flush=True)
    counter.remove()
    for h in maps.handles:
        h.remove()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"settings": {k: str(v) for k, v in vars(a).items()}, "records": records}, a.out)


def score(a) -> None:
    import torch
    from fisedit_engine import mask as M
    from fisedit_engine import word_attention as W
    import mask_variants as variants
    from toyworld import world
    content = set(world.SIZES + world.COLOURS + world.SHAPES)
    records = [r for f in a.files for r in torch.load(f)["records"]]

    def attention(r, run, phrase=False):
        """Summed maps in `run` ("before" or "after") of the changed object words (size, colour, shape), or with
        `phrase` of the changed words' phrases (phrase_tokens)."""
        caption = r[run].replace(",", "").split()
        changed = r["removed" if run == "before" else "added"]
        positions = (phrase_tokens(r[run], changed) if phrase
                     else [p for p in changed if caption[p - 1] in content])
        return r[f"{run}_maps"].float()[positions].sum(0) if positions else None

    def both(r, phrase=False):
        parts = [m / m.max() for m in (attention(r, "after", phrase), attention(r, "before", phrase))
                 if m is not None]
        return sum(parts) if parts else None

    for phrase, what in ((False, "the changed object words"), (True, "the changed words' phrases")):
        print(f"{len(records)} pairs; mean attention of {what} inside the true region over outside it (median per "
              f"kind and run; above 1: the tokens point at the region)")
        for kind in ("colour", "shape", "size", "add", "remove"):
            cells = []
            for run in ("before", "after"):
                ratios = [float(m[r["truth_grid"]].mean() / m[~r["truth_grid"]].mean()) for r in records
                          if r["kind"] == kind and (m := attention(r, run, phrase)) is not None]
                cells.append(f"{run} {statistics.median(ratios):.2f} ({len(ratios)})" if ratios else f"{run} -")
            print(f"  {kind}: {', '.join(cells)}")

    def moved(r, runs=("after",)):
        """The runs' maps weighted by each token's embedding change (`token_change`), normalised, summed."""
        parts = []
        for run in runs:
            m = (r[f"{run}_maps"].float() * r["token_change"][:, None, None]).sum(0)
            parts.append(m / m.max())
        return sum(parts)

    def cut(r, values):
        """The node's cut (Otsu, weak regions dropped, holes and concavities filled) of `values`, along the edges of
        the image the node's cut follows."""
        return M.threshold_mask(values[None], dilate_px=0, image=r["guide"].float()[None])[0]

    def engine_map(r):
        """The engine's map (files collected before it was recorded: the hooks' maps it equals, to 1e-4 of its
        peak)."""
        return r["attention"] if "attention" in r else moved(r, ("after", "before"))

    def product(r, m, power):
        d = r["difference"]
        return cut(r, W.weighted(d[None], m[None], power)[0] if m is not None else d)

    rules = {
        "the difference alone (the rule before word_attention.py)": lambda r: cut(r, r["difference"]),
        "the node's rule: difference x (attention by embedding change, both runs')^2": (
            lambda r: product(r, engine_map(r), W.POWER)),
        "attention by embedding change, both runs', alone": lambda r: cut(r, moved(r, ("after", "before"))),
    }
    for runs, what in ((("after",), "the probe's"), (("before",), "the original run's"),
                       (("after", "before"), "both runs'")):
        for power in (1.0, 2.0, 3.0):
            rules[f"difference x (attention by embedding change, {what})^{power:g}"] = (
                lambda r, runs=runs, power=power: product(r, moved(r, runs), power))
    for power in (1.0, 2.0):
        rules[f"difference x (changed words' attention)^{power:g}"] = lambda r, p=power: product(r, both(r), p)
        rules[f"difference x (phrases' attention)^{power:g}"] = lambda r, p=power: product(r, both(r, True), p)
    rules |= {
        "oracle cut of the difference": lambda r: variants.oracle_cut(r["difference"], r["truth_grid"]),
        "oracle cut of the node's weighted map": lambda r: variants.oracle_cut(
            W.weighted(r["difference"][None], engine_map(r)[None])[0], r["truth_grid"]),
    }
    print(variants.table(records, rules))
    before, node = (rules[name] for name in list(rules)[:2])
    print("\nThe node's rule against the difference alone, pair by pair: undilated IoU, mean ± standard error of the "
          "mean, and the mean change ± its standard error (pairs better / worse by more than 0.005)")
    for kind in ("colour", "shape", "size", "add", "remove", None):
        pairs = [(variants.scores(before(r), r["truth_grid"])[0], variants.scores(node(r), r["truth_grid"])[0])
                 for r in records if kind is None or r["kind"] == kind]
        if len(pairs) < 2:
            continue
        old, new = zip(*pairs)
        change = [b - a for a, b in pairs]

        def mean_se(xs):
            return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs) / len(xs) ** 0.5:.3f}"
        print(f"  {kind or 'all'} ({len(pairs)}): {mean_se(old)} -> {mean_se(new)}, change {mean_se(change)} "
              f"({sum(c > 0.005 for c in change)} / {sum(c < -0.005 for c in change)})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--pairs", type=int, default=60)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--size", type=int, default=256)
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--cfg", type=float, default=5.0)
    c.add_argument("--probe-steps", type=int, default=4)
    c.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("score")
    s.add_argument("files", type=Path, nargs="+")
    a = p.parse_args(argv)
    collect(a) if a.command == "collect" else score(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
