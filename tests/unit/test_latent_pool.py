"""toyworld.train.LatentPool: the training batches' pool of encoded examples renews its oldest slots with the
stream's next scenes, in order, and batches are rows of the pool. Pure torch (a stand-in encoder)."""
import torch

from toyworld import captions, world
from toyworld.train import LatentPool, SceneStream


def _encode(scenes: world.Scenes) -> torch.Tensor:
    """A stand-in for the VAE: a per-scene value that tells every scene apart."""
    return torch.stack([scenes.cell, scenes.colour, scenes.shape], 1).float()[..., None] + scenes.phase[:, :1, None, None]


def test_the_pool_renews_its_oldest_examples_with_the_streams_next_scenes():
    stream = SceneStream(batch=4, seed=5, device="cpu", chunk=3)
    g = torch.Generator().manual_seed(0)
    pool = LatentPool(stream, _encode, size=10, fresh=3, generator=g)
    flat = [stream.at(k) for k in range(10)]
    latents = torch.cat([_encode(s) for s in flat])
    tokens = torch.cat([captions.token_ids(s) for s in flat])
    assert torch.equal(pool.latents, latents[:10]) and torch.equal(pool.tokens, tokens[:10])

    expected_latents, expected_tokens = latents[:10].clone(), tokens[:10].clone()
    # the filling encoded three whole stream batches (12 scenes) and kept 10: new examples start at scene 12
    for r in range(7):
        pool.refresh()
        for m in range(3 * r, 3 * r + 3):
            expected_latents[m % 10] = latents[12 + m]
            expected_tokens[m % 10] = tokens[12 + m]
        assert torch.equal(pool.latents, expected_latents) and torch.equal(pool.tokens, expected_tokens)


def test_a_batch_is_rows_of_the_pool_drawn_by_the_generator():
    stream = SceneStream(batch=4, seed=5, device="cpu")
    pool = LatentPool(stream, _encode, size=8, fresh=2, generator=torch.Generator().manual_seed(1))
    z, tok = pool.batch(32)
    rows = torch.tensor([[torch.equal(z[i], pool.latents[j]) and torch.equal(tok[i], pool.tokens[j])
                          for j in range(8)] for i in range(32)])
    assert rows.any(dim=1).all()
    assert len({int(r.nonzero()[0, 0]) for r in rows}) > 4  # draws spread over the pool
    again = LatentPool(stream, _encode, size=8, fresh=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.batch(32)[0], z)
