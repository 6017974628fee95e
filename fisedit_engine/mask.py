"""The difference mask: where the edited prompt changes the latent, from a few probe steps.

Per probe step, the channel-summed absolute difference between the edited and the cached latent, normalised to
[0, 1] per step and sample (so late steps with small absolute changes count as much as early ones), summed over the
steps, then thresholded: by Otsu's method (the cut that best separates two classes of values) or by the quantile
that selects `edit_size` of the area. Then cleaned: connected regions whose strongest difference is under half of
the map's strongest are dropped (specks, and the faint echoes an edit leaves on other objects), and, after Otsu, the
holes the rest encloses are filled (a change of an object's size or shape differs at its rim first, but the whole
object is redrawn; `edit_size` is a bound on the area, so its cut is not filled); then dilated. The authors cleaned
with a 2x2 opening, which shifted their mask by a latent pixel; a centred 3x3 opening (this module's earlier rule)
removes every region under 3 latent pixels across, which on the toy model was the whole mask of 16% of the edits,
most of them shape changes of small objects (benchmarks/mask_variants.py). A step where nothing differs contributes
nothing (the authors' min-max normalisation divided 0 by 0 there), so an unchanged prompt gives an empty mask.
Differences below 1% of the latent's mean magnitude are rounding, not edits: the probe computes the positive branch
alone, in another batch than the original run did, so on GPUs the last bits differ, and per-step normalisation would
blow that up.

Two refinements measured on the toy world (benchmarks/mask_variants.py, benchmarks/results/mask_variants.md): the
summed map is smoothed by a small Gaussian (an object's change is strong inside and ragged at its rim, an echo is a
lone cell; smoothing joins the one and fades the other), and where the original image is at hand (a VAE connected
to FISEditDifferenceMask), the map is carried up to image pixels along the image's own edges by a guided filter
(He et al., 2010): a changed object ends where the original image shows its edge, which the latent grid can only
place to the nearest cell. A cell then belongs to the mask when a share of its pixels does. Smoothing helped every
edit kind but size changes; following the original's edges helps colour changes and removals most and cost added
objects, for which the original image shows no edge where the new object will be: so the guide is the mean of the
original and of the clean image that the probe's last step predicts (api.edge_guide), which shows the new object.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OTSU_BINS = 256
NOISE_FLOOR = 1e-2  # of the latent's mean channel-summed magnitude
MIN_PEAK = 0.5     # a region is kept when its strongest difference is at least this share of the map's strongest
SMOOTH_SIGMA = 0.8  # latent pixels: the Gaussian that smooths the summed map
EDGE_RADIUS = 2     # latent pixels: the guided filter's window reaches this far around a pixel
EDGE_EPS = 1e-3     # the guided filter's regulariser, for images in [0, 1]: edges weaker than ~0.03 are smoothed over
EDGE_MARGIN = 1.25  # at image pixels the map is cut at this multiple of its threshold on the latent grid ...
EDGE_SHARE = 0.1    # ... and a cell is in the mask when more than this share of its pixels is above the cut
HULL_GROWTH = 1.5   # a region is completed to its convex hull when the hull is at most this many times its area


def difference_map(edited: list[torch.Tensor], cached: list[torch.Tensor],
                   noise_floor: float = NOISE_FLOOR) -> torch.Tensor:
    """[B, H, W] in [0, steps]: per-step normalised channel-summed |edited - cached|, summed over the steps."""
    if len(edited) != len(cached) or not edited:
        raise ValueError("difference_map needs the same, non-zero number of edited and cached latents")
    steps = []
    for e, c in zip(edited, cached, strict=True):
        d = (e.float() - c.float()).abs().sum(dim=1)                       # [B, H, W]
        floor = noise_floor * c.float().abs().sum(dim=1).mean(dim=(1, 2), keepdim=True)
        steps.append(torch.where(d > floor, d, torch.zeros_like(d)))
    return smooth(normalised_sum(steps))


def smooth(diff: torch.Tensor, sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """[B, H, W] convolved with a 5x5 Gaussian of `sigma` pixels, borders replicated (an all-zero map stays zero)."""
    x = torch.arange(-2, 3, dtype=diff.dtype, device=diff.device)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    padded = F.pad(diff[:, None], (2, 2, 2, 2), mode="replicate")
    return F.conv2d(padded, (g[:, None] * g[None, :])[None, None])[:, 0]


def normalised_sum(steps: list[torch.Tensor]) -> torch.Tensor:
    """Sum of [B, H, W] maps, each min-max normalised per sample first; an all-zero map adds nothing."""
    total = None
    for d in steps:
        lo = d.flatten(1).min(dim=1).values[:, None, None]
        span = d.flatten(1).max(dim=1).values[:, None, None] - lo
        normalised = torch.where(span > 0, (d - lo) / span.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d))
        total = normalised if total is None else total + normalised
    return total


def otsu_threshold(values: torch.Tensor, bins: int = OTSU_BINS) -> float:
    """The threshold maximising the between-class variance of a histogram of `values`."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist = torch.histc(values.float(), bins=bins, min=lo, max=hi).double()
    centers = torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device=values.device)
    centers = (centers[:-1] + centers[1:]) / 2
    weight0 = hist.cumsum(0)
    weight1 = hist.sum() - weight0
    mass0 = (hist * centers).cumsum(0)
    mean0 = mass0 / weight0.clamp_min(1e-12)
    mean1 = (mass0[-1] - mass0) / weight1.clamp_min(1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    k = int(torch.argmax(between[:-1]))  # a cut above the last bin would select nothing
    return float(centers[k] + (centers[1] - centers[0]) / 2)


def quantile_threshold(values: torch.Tensor, edit_size: float) -> float:
    """The threshold above which `edit_size` of the values lie."""
    if not 0.0 < edit_size <= 1.0:
        raise ValueError(f"edit_size is a fraction of the image area in (0, 1], got {edit_size}")
    return float(torch.quantile(values.float().flatten(), 1.0 - edit_size))


def components(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W] int64 labels of the mask's 8-connected components (the smallest flat index in each), -1 outside."""
    b, h, w = mask.shape
    big = h * w
    index = torch.arange(big, device=mask.device).view(1, h, w).expand(b, h, w)
    labels = torch.where(mask, index, torch.full_like(index, big))
    while True:
        spread = -F.max_pool2d(-labels[:, None].float(), 3, stride=1, padding=1)[:, 0].long()
        spread = torch.where(mask, torch.minimum(spread, labels), labels)
        if torch.equal(spread, labels):
            return torch.where(mask, labels, torch.full_like(labels, -1))
        labels = spread


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool with every region that the mask encloses (unreachable from the border through unmasked
    pixels, 4-connected) set: a change of an object's size or shape differs at the object's rim first, and the
    object inside that rim is redrawn too."""
    outside = torch.zeros_like(mask)
    outside[:, 0, :], outside[:, -1, :], outside[:, :, 0], outside[:, :, -1] = (
        ~mask[:, 0, :], ~mask[:, -1, :], ~mask[:, :, 0], ~mask[:, :, -1])
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32, device=mask.device)[None, None]
    while True:
        grown = (F.conv2d(outside[:, None].float(), cross, padding=1)[:, 0] > 0) & ~mask
        if torch.equal(grown, outside):
            return ~outside
        outside = grown


def convex_hull(cells: torch.Tensor) -> torch.Tensor:
    """[H, W] bool: the cells whose centres lie in the convex hull of the centres of `cells` [H, W] (bool, any
    shape of region). The hull's corners are among each row's outermost cells, so at most 2H points enter
    Andrew's monotone chain; the test is exact (integer cross products)."""
    rows = cells.any(1).nonzero()[:, 0]
    if len(rows) == 0:
        return cells.clone()
    w = cells.shape[1]
    columns = torch.arange(w, device=cells.device)
    left = torch.where(cells[rows], columns, w).amin(1)
    right = torch.where(cells[rows], columns, -1).amax(1)
    points = sorted(set(zip(rows.tolist() * 2, left.tolist() + right.tolist())))

    def turn(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def chain(ordered):
        out = []
        for q in ordered:
            while len(out) >= 2 and turn(out[-2], out[-1], q) <= 0:
                out.pop()
            out.append(q)
        return out[:-1]

    hull = chain(points) + chain(reversed(points))
    if len(hull) < 3:  # collinear: a connected straight run, its own hull
        return cells.clone()
    ys, xs = torch.meshgrid(torch.arange(cells.shape[0], device=cells.device), columns, indexing="ij")
    inside = torch.ones_like(cells)
    for a, b in zip(hull, hull[1:] + hull[:1]):
        inside &= turn(a, b, (ys, xs)) >= 0  # every corner of the chain turns the same way (turn > 0)
    return inside


def fill_concavities(mask: torch.Tensor, max_growth: float = HULL_GROWTH) -> torch.Tensor:
    """[B, H, W] bool: each 8-connected region of the mask completed to its convex hull where the hull is at most
    `max_growth` times the region's area. A shape change (a triangle redrawn as a square) differs where the two
    outlines differ, a region with a bite out of it: the unchanged inside of the old object is redrawn too, and
    `fill_holes` only reaches it when the difference encloses it. A region whose hull is much larger (an arc, an
    L) is not a compact object's outline, and stays as it is."""
    out = mask.clone()
    labels = components(mask)
    for b in range(mask.shape[0]):
        for label in torch.unique(labels[b][mask[b]]).tolist():
            region = labels[b] == label
            hull = convex_hull(region)
            if hull.sum() <= max_growth * region.sum():
                out[b] |= hull
    return out


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    if pixels <= 0:
        return mask
    pixels = min(pixels, max(mask.shape[-2:]))  # beyond the map's size the result is the same: all or nothing
    return (F.max_pool2d(mask[:, None].float(), 2 * pixels + 1, stride=1, padding=pixels) > 0)[:, 0]


def drop_weak_components(mask: torch.Tensor, diff: torch.Tensor, min_peak: float = MIN_PEAK) -> torch.Tensor:
    """[B, H, W] bool: the mask less its connected regions whose largest `diff` is under `min_peak` of the largest
    `diff` inside the mask (per sample)."""
    out = mask.clone()
    labels = components(mask)
    for b in range(mask.shape[0]):
        if not mask[b].any():
            continue
        ids, inverse = torch.unique(labels[b][mask[b]], return_inverse=True)
        peaks = torch.zeros(len(ids), dtype=diff.dtype, device=diff.device).scatter_reduce(
            0, inverse, diff[b][mask[b]], "amax", include_self=False)
        weak = ids[peaks < min_peak * peaks.max()]
        out[b] &= ~torch.isin(labels[b], weak)
    return out


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """[..., H, W]: the mean over the (2r+1)^2 window around each pixel, the window clipped at the borders; from
    running sums, so the cost does not grow with the radius."""
    for dim in (-2, -1):
        n = x.shape[dim]
        sums = x.cumsum(dim)
        # padded[j] = the sum of the first clamp(j - r, 0, n) values, so each window is padded[i + 2r + 1] - padded[i]
        edge = list(x.shape)
        edge[dim] = radius + 1
        head = sums.new_zeros(edge)
        edge[dim] = radius
        tail = sums.narrow(dim, n - 1, 1).expand(edge)
        padded = torch.cat([head, sums, tail], dim)
        i = torch.arange(n, device=x.device)
        counts = ((i + radius + 1).clamp(max=n) - (i - radius).clamp(min=0)).to(x.dtype)
        shape = [1] * x.dim()
        shape[dim] = n
        x = (padded.narrow(dim, 2 * radius + 1, n) - padded.narrow(dim, 0, n)) / counts.view(shape)
    return x


def guided_filter(guide: torch.Tensor, p: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al.'s guided filter with a colour guide: `p` [H, W] smoothed, except across the edges of `guide`
    [C, H, W]. Per window, p is fitted as a linear function of the guide's colour; the fits are averaged."""
    c = guide.shape[0]
    mean_i, mean_p = box_mean(guide, radius), box_mean(p, radius)
    cov_ip = box_mean(guide * p, radius) - mean_i * mean_p
    var_i = box_mean(guide[:, None] * guide[None], radius) - mean_i[:, None] * mean_i[None]
    var_i = var_i.permute(2, 3, 0, 1) + eps * torch.eye(c, dtype=guide.dtype, device=guide.device)
    a = torch.linalg.solve(var_i, cov_ip.permute(1, 2, 0)[..., None])[..., 0].permute(2, 0, 1)
    b = mean_p - (a * mean_i).sum(0)
    return (box_mean(a, radius) * guide).sum(0) + box_mean(b, radius)


def along_edges(diff: torch.Tensor, image: torch.Tensor, threshold: float) -> torch.Tensor:
    """[h, w] bool: the cells of the latent-grid map `diff` [h, w] whose pixels, after the map is carried up to the
    pixels of `image` [H, W, 3] along its edges, are above `EDGE_MARGIN * threshold` in more than `EDGE_SHARE`."""
    h, w = diff.shape
    scale = image.shape[0] // h
    if image.shape[0] != scale * h or image.shape[1] != scale * w:
        raise ValueError(f"the image is {image.shape[1]}x{image.shape[0]} pixels, not a whole multiple of the "
                         f"latent's {w}x{h}: connect the VAE that decodes this model's latents")
    guide = image.to(diff.device, torch.float64).permute(2, 0, 1)
    up = F.interpolate(diff[None, None].double(), scale_factor=scale, mode="bilinear", align_corners=False)[0, 0]
    fine = guided_filter(guide, up, EDGE_RADIUS * scale, EDGE_EPS)
    share = F.avg_pool2d((fine > EDGE_MARGIN * threshold)[None, None].double(), scale)[0, 0]
    return share > EDGE_SHARE


def edge_guide(original: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The image whose edges the Otsu cut follows: the mean of the original image and of the clean image the probe
    predicts (both [..., H, W, 3]; the prediction clipped to [0, 1])."""
    return (original + predicted.to(original.device, original.dtype).clamp(0, 1)) / 2


def threshold_mask(diff: torch.Tensor, method: str = "otsu", edit_size: float = 0.15, dilate_px: int = 1,
                   min_peak: float = MIN_PEAK, image: torch.Tensor | None = None,
                   max_hull_growth: float = HULL_GROWTH) -> torch.Tensor:
    """[B, H, W] bool from a difference map: per sample, threshold, weak regions dropped, holes and concavities
    filled (Otsu only: `edit_size` bounds the area, so its cut is only ever reduced; `max_hull_growth` 1 fills no
    concavity), dilation. All-zero maps stay empty. With the
    original image ([B, H*s, W*s, 3] in [0, 1]) the Otsu cut follows the image's edges (`along_edges`); the
    `edit_size` cut does not (it would no longer bound the area). The image may live on another device than `diff`:
    each sample's is moved to `diff`'s."""
    out = []
    for b, d in enumerate(diff):
        if not (d > 0).any():
            out.append(torch.zeros_like(d, dtype=torch.bool))
            continue
        if method == "otsu":
            t = otsu_threshold(d)
            out.append(along_edges(d, image[b if image.shape[0] > 1 else 0], t) if image is not None else d > t)
        else:
            out.append(d >= quantile_threshold(d, edit_size))
    kept = drop_weak_components(torch.stack(out), diff, min_peak)
    if method == "otsu":
        kept = fill_concavities(fill_holes(kept), max_hull_growth)
    return dilate(kept, dilate_px)
