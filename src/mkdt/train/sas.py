"""SAS subsets: the subset-selection baseline for contrastive learning that MKDT compares with.

SAS ("Subsets that maximise Augmentation Similarity"; Joshi & Mirzasoleiman, *Data-Efficient
Contrastive Self-supervised Learning*, ICML 2023, code ``sas-data-efficient-contrastive-learning``)
keeps, within each latent class, the examples whose augmented views are most similar in
expectation to the other examples of their class. Given D_real (N images), a budget n, features
for clustering and a proxy encoder f:

1. latent classes V_1..V_k: k-means (scikit-learn, k-means++, ``KMEANS_INITS`` restarts) on the
   features (:func:`latent_classes`);
2. per-class budgets n_l proportional to |V_l|, rounded by largest remainder so that they sum
   to n exactly (:func:`class_budgets`);
3. expected augmentation similarity inside each class from V views per image, u_i^p = f(a_p(x_i))
   / ||f(a_p(x_i))|| with independent random augmentations a_p (:func:`encode_views`):
   s_ij = 1/(V(V-1)) sum_{p != q} <u_i^p, u_j^q> for V >= 2 (so s_ii is the alignment of two
   different views of x_i), s_ij = <u_i^1, u_j^1> for V = 1 (:func:`augmentation_similarity`);
4. in each class, greedy maximisation of SAS's objective
   F(S) = sum_{i in S} r_i - sum_{{i, j} in S, i != j} s_ij,  r_i = sum_{j in V_l} max(s_ij, 0),
   i.e. n_l steps that add the e of largest gain g(e | S) = r_e - sum_{j in S} s_ej (ties: the
   lower position) (:func:`greedy_select`).

Deviations from the SAS release: latent classes come from k-means on the caller's features (mkdt:
the teacher's targets) rather than CLIP (zero-shot or a few labels) or k-means on the proxy's
embeddings, and the proxy is the caller's (mkdt: a KD expert or the teacher, where SAS trains a
small network briefly with contrastive learning); budgets are rounded by largest remainder (the
release floors each class's fraction, so its subset is smaller than asked); the greedy is exact
(all gains updated each step) rather than lazy, and it applies the redundancy term
-sum_{j in S} s_ej that SAS's gain states. The release's ``add`` zeroes the chosen example's row
of s, which cancels that term, so its subsets are each class's top r_i. At MKDT's 2-5% budgets the
term changes few picks (it is at most n_l, while r_e sums |V_l| similarities): 3.2% of them on a
10,000-image CIFAR-10 pool at n = 1,000.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mkdt.nn.augment import SSLAugment

KMEANS_INITS = 3  # k-means++ restarts (scikit-learn's n_init); the best inertia wins


def latent_classes(features: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """(N,) int64 cluster of each row of ``features`` (N, D): k-means with k clusters, euclidean,
    seeded with ``seed`` (any int >= 0; reduced mod 2^32 for scikit-learn)."""
    from sklearn.cluster import KMeans  # imported here: scikit-learn is slow to import

    if not 1 <= k <= len(features):
        raise ValueError(f"k-means needs 1 <= k <= {len(features)} rows, got k = {k}")
    kmeans = KMeans(n_clusters=k, n_init=KMEANS_INITS, random_state=seed % 2**32)
    labels = kmeans.fit_predict(features.detach().float().cpu().numpy())
    return torch.from_numpy(labels).long()


def class_budgets(sizes: torch.Tensor, total: int) -> torch.Tensor:
    """Largest-remainder split of ``total`` over classes of ``sizes`` (k,): n_l = floor(q_l) plus
    one for the total - sum floor(q_l) classes of largest fractional part (ties: lower class),
    q_l = total * sizes_l / sum(sizes). Sums to ``total`` exactly, n_l <= sizes_l."""
    sizes = sizes.long()
    count = int(sizes.sum())
    if not 0 <= total <= count:
        raise ValueError(f"cannot take {total} of {count} examples")
    quota = total * sizes
    budgets = quota // count
    left = total - int(budgets.sum())
    order = sorted(range(len(sizes)), key=lambda lbl: (-int(quota[lbl] % count), lbl))
    budgets[order[:left]] += 1
    return budgets


@torch.no_grad()
def encode_views(
    proxy: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    augment: SSLAugment,
    views: int,
    gen: torch.Generator,
    batch_size: int = 1024,
) -> torch.Tensor:
    """(V, N, D) unit-norm proxy embeddings u_i^p of ``views`` augmented views of every uint8 image
    (N, C, H, W), on the CPU. View p uses the augmentation's view ``p % 2`` (the asymmetric pair of
    the SSL recipe); parameters are drawn from ``gen`` view by view, batch by batch."""
    out = []
    for p in range(views):
        chunks = [
            F.normalize(proxy(augment(images[i : i + batch_size], gen, view=p % 2)).float(), dim=1).cpu()
            for i in range(0, len(images), batch_size)
        ]
        out.append(torch.cat(chunks))
    return torch.stack(out)


def augmentation_similarity(u: torch.Tensor) -> torch.Tensor:
    """(n, n) expected augmentation similarity of unit embeddings ``u`` (V, n, D): the mean of
    <u_i^p, u_j^q> over ordered pairs of different views p != q, computed as
    ((sum_p u^p)(sum_p u^p)^T - sum_p u^p u^p^T) / (V (V - 1)); for V = 1, u^1 u^1^T."""
    views = u.shape[0]
    if views == 1:
        return u[0] @ u[0].T
    total = u.sum(dim=0)
    same_view = torch.einsum("pid,pjd->ij", u, u)
    return (total @ total.T - same_view) / (views * (views - 1))


def greedy_select(similarity: torch.Tensor, budget: int) -> torch.Tensor:
    """Positions (budget,) chosen in order by the greedy maximisation of
    F(S) = sum_{i in S} r_i - sum_{{i, j} in S, i != j} s_ij with r_i = sum_j max(s_ij, 0): each
    step adds argmax_e g(e | S) = r_e - sum_{j in S} s_ej over e not in S (ties: lower position)."""
    gain = similarity.clamp(min=0).sum(dim=1).double()
    chosen = []
    for _ in range(budget):
        e = int(gain.argmax())
        chosen.append(e)
        gain -= similarity[:, e]
        gain[e] = -torch.inf
    return torch.tensor(chosen, dtype=torch.long)


def sas_select(clusters: torch.Tensor, embeddings: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) indices of the SAS subset: for each latent class l (``clusters`` (N,) in 0..k-1)
    the greedy choice of its :func:`class_budgets` share under the class's
    :func:`augmentation_similarity` of ``embeddings`` (V, N, D); classes in order."""
    k = int(clusters.max()) + 1
    budgets = class_budgets(torch.bincount(clusters, minlength=k), total)
    picks = []
    for label in range(k):
        members = (clusters == label).nonzero().flatten()
        if budgets[label] > 0:
            similarity = augmentation_similarity(embeddings[:, members])
            picks.append(members[greedy_select(similarity, int(budgets[label]))])
    return torch.cat(picks)
