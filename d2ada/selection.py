"""D2ADA's selection rules (paper Sec. 3.2-3.4), on arrays of region statistics; no I/O, no model.

A target region r has a feature z_r (256-d, the mean of the head feature over its pixels), a
pseudo label c_r = argmax of its mean softmax, an uncertainty u_r and a pixel count.

- Density-aware selection (Sec. 3.2): for every class c, fit Gaussian mixtures p_S(z | c) on source
  regions of class c and p_T(z | c) on target regions of class c (scikit-learn, full covariance,
  random_state 0, max_iter 200, n_components = clip(N_T,c // 100, 1, 10)); score target pool regions by
      d(z) = log p_S(z | c) - log p_T(z | c)        (ascending: dense in the target, rare in the source)
  keep the first 200 per class, weight class c by int(log10(|mean_c d|)) and merge the classes with a
  weighted round-robin.
- Uncertainty selection (Sec. 3.3): u_r = mean over the region's pixels of mean_k(-p_k log2 p_k);
  highest first.
- Dynamic scheduling (Sec. 3.4): lambda = alpha * 2^(beta (1 - t)); the density part gets
  lambda * B and the uncertainty part (1 - lambda) * B of the round's budget B (in pixels).
  t counts selection rounds FROM 1, so the first selection has lambda = alpha (upstream counts from
  0: lambda = 2 and a negative uncertainty budget); lambda is clipped to [0, 1].
- Budget (upstream RegionActiveDataset.expand_training_set): regions are taken in order until their
  pixels reach the budget; the region that crosses it is kept, so the overshoot is under one region.

Never hangs: the mixtures are fitted in this process, one after another (no fork-after-threads pool,
upstream's known hang) or in a bounded pool of threads, with BLAS threads bounded by threadpoolctl; the round-robin terminates for
any weights (weights < 1 count as 1; a mean difference of 0 or NaN gives weight 1).
"""
import math
import time

import numpy as np


def _quiet(record, echo=True):
    pass


# ------------------------------------------------------------------------------------------------
# Density (Sec. 3.2)
# ------------------------------------------------------------------------------------------------
def n_components(n_target_regions):
    """Mixture size for a class: clip(N // 100, 1, 10) (official gmm_scoring.py)."""
    return int(np.clip(n_target_regions // 100, 1, 10))


REG_COVAR = 1e-6  # sklearn's default, as upstream (gmm_scoring.py constructs GaussianMixture without reg_covar)


def fit_gmm(x, k, max_iter=200, seed=0, reg_covar=REG_COVAR, retries=6):
    """Full-covariance GMM with k components (at most one per sample). Where sklearn cannot factor a
    covariance (collapsed or badly scaled features; upstream then crashes with "ill-defined empirical
    covariance"), the fit is repeated with reg_covar x 10 (at least 1e-6 of the features' mean
    variance), up to `retries` times; the gm's reg_covar
    says what was used (logged per class as `reg_covar`)."""
    from sklearn.mixture import GaussianMixture
    x = np.asarray(x, dtype=np.float64)
    for attempt in range(retries + 1):
        try:
            return GaussianMixture(n_components=min(k, len(x)), covariance_type="full", random_state=seed,
                                   max_iter=max_iter, reg_covar=reg_covar).fit(x)
        except ValueError as e:
            if "ill-defined empirical covariance" not in str(e) or attempt == retries:
                raise
            # x 10, and at least 1e-6 of the features' mean variance (an absolute 1e-6 is nothing for large features)
            reg_covar = max(reg_covar * 10, 1e-6 * float(x.var(0).mean()))


def class_weight(diff):
    """int(log10(|mean d|)) as upstream, but at least 1 (upstream loops forever on weights <= 0 and
    crashes on a mean of 0)."""
    m = abs(float(np.mean(diff))) if len(diff) else 0.0
    if not math.isfinite(m) or m <= 0:
        return 1
    return max(1, int(math.log10(m)))


def density_scores(src_feat, src_cls, trg_feat, trg_cls, classes, threads=1, workers=1, max_iter=200,
                   min_regions=2, log=_quiet):
    """Per class c: (indices of the target regions of class c, d = log p_S - log p_T for them).
    Classes with fewer than `min_regions` target or source regions are skipped (no density to compare;
    upstream skips them for the target and crashes for the source). Returns {c: (idx, d)}.
    threads: BLAS/OpenMP threads per fit (1 is best on a busy machine: OpenBLAS with several threads
    on oversubscribed cores slows down 20x); workers: classes fitted at once in a bounded thread pool
    (threads, not processes: nothing is forked; the results do not depend on it)."""
    from concurrent.futures import ThreadPoolExecutor
    from sklearn.mixture import GaussianMixture  # noqa: F401  (load its OpenMP/BLAS libraries first:
    from threadpoolctl import threadpool_limits  # threadpool_limits only bounds libraries already loaded)

    jobs = []
    for c in classes:
        t_idx = np.flatnonzero(trg_cls == c)
        n_src = int((src_cls == c).sum())
        if len(t_idx) < min_regions or n_src < min_regions:
            log({"event": "density_skip_class", "class": int(c), "target_regions": int(len(t_idx)),
                 "source_regions": n_src}, echo=False)
            continue
        jobs.append((int(c), t_idx))

    def fit_class(job):
        c, t_idx = job
        t0 = time.time()
        k = n_components(len(t_idx))
        x = np.asarray(trg_feat[t_idx], dtype=np.float64)
        gm_s = fit_gmm(src_feat[src_cls == c], k, max_iter)
        gm_t = fit_gmm(x, k, max_iter)
        d = gm_s.score_samples(x) - gm_t.score_samples(x)
        rec = {"event": "gmm", "class": c, "components": k, "target_regions": int(len(t_idx)),
               "source_regions": int((src_cls == c).sum()), "seconds": round(time.time() - t0, 2),
               "reg_covar": [gm_s.reg_covar, gm_t.reg_covar]}
        return c, t_idx, d, rec

    out = {}
    with threadpool_limits(limits=threads), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for c, t_idx, d, rec in pool.map(fit_class, jobs):
            out[c] = (t_idx, d)
            log(rec, echo=False)
    return out


def weighted_round_robin(lists, weights):
    """Merge lists: each cycle takes up to weights[i] items from list i (at least 1). Terminates for
    any weights: every cycle removes at least one item from every non-empty list."""
    lists = [list(x) for x in lists]
    pos = [0] * len(lists)
    out = []
    while any(p < len(x) for p, x in zip(pos, lists)):
        for i, x in enumerate(lists):
            w = weights[i] if i < len(weights) else 1
            w = max(1, int(w)) if w is not None and math.isfinite(w) else 1
            take = x[pos[i]:pos[i] + w]
            out.extend(take)
            pos[i] += len(take)
    return out


def density_order(scores, pool, per_class=200):
    """Candidate target regions of the density criterion, in selection order: per class the (up to)
    `per_class` pool regions with the lowest d, classes merged by weighted round-robin.
    scores: {c: (idx, d)}; pool: bool mask over all target regions. Returns (order, score of each, weights)."""
    lists, weights = [], []
    for c in sorted(scores):
        idx, d = scores[c]
        keep = pool[idx]
        idx, d = idx[keep], d[keep]
        o = np.argsort(d, kind="stable")[:per_class]
        lists.append(list(zip(idx[o].tolist(), d[o].tolist())))
        weights.append(class_weight(scores[c][1]))
    merged = weighted_round_robin(lists, weights)
    return [i for i, _ in merged], [s for _, s in merged], dict(zip(sorted(scores), weights))


# ------------------------------------------------------------------------------------------------
# Uncertainty (Sec. 3.3), budget, schedule (Sec. 3.4)
# ------------------------------------------------------------------------------------------------
def uncertainty_order(entropy, pool):
    """Pool regions by region-mean entropy, highest first (stable for ties)."""
    idx = np.flatnonzero(pool)
    o = np.argsort(-entropy[idx], kind="stable")
    return idx[o].tolist(), entropy[idx][o].tolist()


def fill_budget(order, pixels, budget_px, taken=None):
    """Regions from `order` (skipping those in `taken`) until their pixels reach budget_px; the
    crossing region is kept (upstream). Returns (chosen indices, pixels used)."""
    taken = set() if taken is None else taken
    chosen, used = [], 0
    if budget_px <= 0:
        return chosen, used
    for r in order:
        if r in taken:
            continue
        chosen.append(r)
        taken.add(r)
        used += int(pixels[r])
        if used >= budget_px:
            break
    return chosen, used


def dynamic_lambda(t, alpha=1.0, beta=1.0):
    """lambda = alpha * 2^(beta (1 - t)), t = 1 for the first selection; clipped to [0, 1]."""
    return float(min(1.0, max(0.0, alpha * 2.0 ** (beta * (1 - t)))))


def project_pca(src_feat, trg_feat, dim, seed=0):
    """OURS, not upstream (ablation of --density-pca): PCA fitted on the source and target region features
    together, both projected to `dim` dimensions before the mixtures. Returns (src, trg, explained share)."""
    from sklearn.decomposition import PCA
    x = np.concatenate([src_feat, trg_feat]).astype(np.float64)
    pca = PCA(n_components=min(dim, x.shape[1], len(x)), random_state=seed).fit(x)
    return (pca.transform(np.asarray(src_feat, np.float64)), pca.transform(np.asarray(trg_feat, np.float64)),
            float(pca.explained_variance_ratio_.sum()))


def select_round(trg, src, pool, budget_px, lam, method="d2ada", classes=None, threads=1, workers=1, seed=0,
                 per_class=200, max_iter=200, log=_quiet, pca=0):
    """One selection round over all target regions.
    trg: dict of arrays feat (R, D), prob (R, C), entropy (R,), pixels (R,); src: dict feat, prob;
    pool: bool (R,) regions still unlabelled; budget_px: this round's budget in pixels; lam: density
    share. method: d2ada | density | uncertainty | random. pca: 0 = the mixtures on the 256-d features
    (upstream); d > 0 = on a d-dimensional PCA projection (ours, an ablation).
    Returns a list of (region index, criterion, score) in selection order and an info dict; its
    "density_classes" holds, per class, N_S and N_T (source / target regions) and the mixture size."""
    pool = np.asarray(pool, bool).copy()
    if method == "density":
        lam = 1.0
    elif method in ("uncertainty", "random"):
        lam = 0.0
    b_d = budget_px * lam
    info = {"lambda": lam, "budget_px": float(budget_px), "budget_density_px": float(b_d)}
    picks, taken = [], set()
    if method == "random":
        order = np.random.default_rng(seed).permutation(np.flatnonzero(pool)).tolist()
        chosen, used = fill_budget(order, trg["pixels"], budget_px, taken)
        info["used_random_px"] = used
        return [(r, "random", 0.0) for r in chosen], info
    used_d = 0
    if b_d > 0:
        t0 = time.time()
        classes = range(trg["prob"].shape[1]) if classes is None else classes
        s_feat, t_feat = src["feat"], trg["feat"]
        if pca:
            s_feat, t_feat, share = project_pca(s_feat, t_feat, pca, seed=0)
            info["density_pca"] = {"dim": int(s_feat.shape[1]), "explained_variance": round(share, 4)}
        recs = []

        def keep(rec, echo=True):
            recs.append(rec)
            log(rec, echo=echo)
        scores = density_scores(s_feat, src["prob"].argmax(1), t_feat, trg["prob"].argmax(1),
                                classes, threads, workers, max_iter, log=keep)
        info["density_classes"] = {str(r["class"]): {"N_S": r["source_regions"], "N_T": r["target_regions"],
                                                     "components": r.get("components", 0)}
                                   for r in sorted(recs, key=lambda r: r["class"])}
        order, sc, weights = density_order(scores, pool, per_class)
        chosen, used_d = fill_budget(order, trg["pixels"], b_d, taken)
        score_of = dict(zip(order, sc))
        picks += [(r, "density", float(score_of[r])) for r in chosen]
        info.update(class_weights={str(k): v for k, v in weights.items()}, density_seconds=round(time.time() - t0, 2))
    info["used_density_px"] = used_d
    # the uncertainty part gets the rest of the round's budget (what density could not place too)
    b_u = budget_px - used_d
    pool[list(taken)] = False
    order, sc = uncertainty_order(trg["entropy"], pool)
    chosen, used_u = fill_budget(order, trg["pixels"], b_u, taken)
    score_of = dict(zip(order, sc))
    picks += [(r, "uncertainty", float(score_of[r])) for r in chosen]
    info.update(budget_uncertainty_px=float(b_u), used_uncertainty_px=used_u)
    return picks, info
