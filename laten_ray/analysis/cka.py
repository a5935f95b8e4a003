"""Linear CKA between every target layer and every source layer (docs/method.md §11).

The heatmaps use the unbiased minibatch estimator (Nguyen, Raghu & Kornblith 2021, with the
unbiased HSIC of Song et al. 2012): the answer tokens are cut into pieces of at most
`gram_tokens`; each model turns a piece into one U-centred Gram matrix per layer, [b, b]; and
the CKA of target layer i with source layer j is

    sum_p <U(K_p,i), U(L_p,j)> / sqrt(sum_p ||U(K_p,i)||^2 * sum_p ||U(L_p,j)||^2)

(each piece's HSIC_1 = <U(K), U(L)> / (b (b - 3)), weighted by its b (b - 3) token pairs, so
the normalisers cancel). Why this statistic: it is the only one of the three exact-or-unbiased
options whose memory depends on neither the widths nor the number of tokens, and whose two
halves are computed by each model alone (a Ray actor sends Grams, never activations):
  - feature space, exact: the cross-covariance Y^T X [d_t, d_s] of every layer pair, L_t L_s
    d_t d_s floats (Llama-2 13B/7B FFN: 40 x 32 x 13824 x 11008 x 4 B = 779 GB);
  - full Grams, exact: n x n per layer, n = all answer tokens (quadratic in the data), and
    building it needs every token's activations at once;
  - minibatch Grams: L b^2 per model and batch, bounded by `gram_tokens`, reduced to L_t L_s
    scalars at once.
With one piece holding every token it is the debiased full-sample CKA.
"""
from __future__ import annotations

import torch

from ..arch import MODULES


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Full-sample linear CKA (Kornblith et al. 2019) of x [n, d_x] and y [n, d_y] (the same n
    examples): ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), columns centred."""
    x = x.double() - x.double().mean(0)  # [n, d_x]
    y = y.double() - y.double().mean(0)  # [n, d_y]
    return float((y.T @ x).pow(2).sum() / ((x.T @ x).norm() * (y.T @ y).norm()))


def u_center(gram: torch.Tensor) -> torch.Tensor:
    """U-centring (Szekely & Rizzo 2014) of Gram matrices [..., n, n], n >= 4, in float64: the
    diagonal is zeroed, then U_ij = K_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2)) off the diagonal,
    with r the row sums and s the total. Then HSIC_1(K, L) = <U(K), U(L)> / (n (n - 3))."""
    n = gram.shape[-1]
    k = gram.double().clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    rows = k.sum(-1, keepdim=True)         # [..., n, 1]
    total = rows.sum(-2, keepdim=True)     # [..., 1, 1]
    u = k - rows / (n - 2) - rows.transpose(-1, -2) / (n - 2) + total / ((n - 1) * (n - 2))
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u


def pieces(n: int, most: int) -> list[int]:
    """Sizes of the nearly equal pieces n tokens are cut into, each at most `most` (>= 8), so
    every piece has at least 4 tokens, the least HSIC_1 is defined for; [] when n < 4."""
    if n < 4:
        return []
    k = -(-n // most)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


class CKA:
    """Sums of the U-centred Gram products, piece by piece: [L_t, L_s] cross terms and each
    layer's self term per module. Nothing here grows with the number of tokens."""

    def __init__(self, n_target: int, n_source: int, modules=MODULES):
        f64 = torch.float64
        self.cross = {m: torch.zeros(n_target, n_source, dtype=f64) for m in modules}
        self.self_t = {m: torch.zeros(n_target, dtype=f64) for m in modules}
        self.self_s = {m: torch.zeros(n_source, dtype=f64) for m in modules}
        self.tokens = self.pieces = 0

    def add(self, target: dict, source: dict) -> None:
        """One batch: {module: [U-centred Grams [L, b_p, b_p] per piece p]} of each model, the
        pieces of the same tokens in the same order."""
        for m in self.cross:
            for gt, gs in zip(target[m], source[m], strict=True):
                ft, fs = gt.flatten(1), gs.flatten(1)   # [L_t, b^2], [L_s, b^2]
                self.cross[m] += ft @ fs.T              # [L_t, L_s]
                self.self_t[m] += ft.pow(2).sum(1)
                self.self_s[m] += fs.pow(2).sum(1)
        first = next(iter(self.cross))
        self.pieces += len(target[first])
        self.tokens += sum(g.shape[-1] for g in target[first])

    def values(self) -> dict[str, torch.Tensor]:
        """{module: CKA [L_t, L_s]}."""
        return {m: self.cross[m] / (self.self_t[m][:, None] * self.self_s[m][None, :]).sqrt()
                for m in self.cross}


def alignment_fit(cka: torch.Tensor, layers: torch.Tensor) -> dict:
    """How the source layers alignment picked ([L_t], entry i feeds target layer i) sit in the
    CKA rows [L_t, L_s]: their CKA, the row maxima, how often they are the row's best, and their
    mean rank in the row (1 = most similar)."""
    rows = torch.arange(cka.shape[0])
    at = cka[rows, layers]                                       # [L_t]
    rank = (cka > at[:, None]).sum(1) + 1                        # [L_t]
    return {"aligned_mean": float(at.mean()), "best_mean": float(cka.max(1).values.mean()),
            "aligned_is_best": float((rank == 1).double().mean()), "aligned_rank_mean": float(rank.double().mean())}
