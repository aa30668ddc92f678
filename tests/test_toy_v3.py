"""Toy domains v3 (common/toy.py, SEGDA_TOY_VERSION=3): the properties the generator promises, checked on a
few generated scenes (cheap: no full generation).
1. per-image / per-instance appearance in the targets, one consistent colour per class in the sources;
2. class-conditional confusions (target sidewalk/terrain/truck/bus painted in a source class's colour);
3. a hard sub-domain: a fixed share of every target split in its own city, listed in hard.txt;
4. label shift: person, rider, bus, truck several times more frequent in the target than in GTA5-style;
and v2 stays byte-identical (the committed v2 results keep their data)."""
import hashlib

import numpy as np

from common import toy as T


def _class_colours(domain, n=16):
    """Mean RGB of every class in each of n rendered scenes: {class: [n x 3]}."""
    pal = T._palette_v3(domain, 0)
    out = {}
    for i in range(n):
        rng = np.random.default_rng([0, list(T.DOMAINS).index(domain), i])
        lab, inst = T._scene(domain, rng, T.DOMAINS_V3[domain])
        img = np.asarray(T._render_v3(lab, inst, domain, pal, rng, hard=False), np.float32) / 255
        for c in (T.ROAD, T.SIDEWALK, T.BUILDING, T.SKY, T.CAR):
            m = lab == c
            if m.sum() > 20:
                out.setdefault(c, []).append(img[m].mean(0))
    return {c: np.array(v) for c, v in out.items()}


def test_sources_consistent_targets_vary_per_image():
    src, tgt = _class_colours("gta5"), _class_colours("cityscapes")
    for c in (T.ROAD, T.SIDEWALK, T.BUILDING, T.SKY):
        s_spread = src[c].std(0).mean()
        t_spread = tgt[c].std(0).mean()
        assert s_spread < 0.04, (c, s_spread)          # one appearance per class in the source
        assert t_spread > 3 * s_spread and t_spread > 0.06, (c, s_spread, t_spread)  # drawn per image


def test_instances_differ_within_a_target_image():
    pal = T._palette_v3("cityscapes", 0)
    spreads = []
    for i in range(12):
        rng = np.random.default_rng([0, 2, i])
        lab, inst = T._scene("cityscapes", rng, T.DOMAINS_V3["cityscapes"])
        img = np.asarray(T._render_v3(lab, inst, "cityscapes", pal, rng), np.float32) / 255
        cars = [img[(inst == k)].mean(0) for k in np.unique(inst[lab == T.CAR]) if (inst == k).sum() > 30]
        if len(cars) >= 2:
            spreads.append(np.array(cars).std(0).mean())
    assert spreads and np.median(spreads) > 0.05, spreads


def test_confusions_use_the_source_colour_of_another_class():
    tgt = T._palette_v3("cityscapes", 0)
    for a, b in ((T.SIDEWALK, T.ROAD), (T.TERRAIN, T.VEG), (T.TRUCK, T.CAR), (T.BUS, T.CAR)):
        assert np.abs(tgt[a] - T.BASE[b]).max() <= 0.031, (a, b)
        assert np.abs(tgt[a] - T.BASE[a]).max() > 0.1, (a, b)  # and not its own source colour


def test_hard_city_share_in_every_split(tmp_path, monkeypatch):
    monkeypatch.setitem(T.COUNTS, "cityscapes", {"train": 12, "val": 8, "test": 8})
    T._write_domain("cityscapes", tmp_path, 0, version=3)
    hard = set((tmp_path / "hard.txt").read_text().split())
    for split in ("train", "val", "test"):
        files = sorted((tmp_path / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))
        in_hard = [p for p in files if p.name in hard]
        assert len(in_hard) == round(T.HARD_SHARE * len(files)), split
        assert {p.parent.name for p in in_hard} == {T.HARD_CITY[split]}
    # the hard style is much darker than the rest
    imgs = sorted((tmp_path / "leftImg8bit" / "train").rglob("*.png"))
    from PIL import Image
    mean = {p.name: np.asarray(Image.open(p), np.float32).mean() for p in imgs}
    assert np.mean([v for k, v in mean.items() if k in hard]) < 0.75 * np.mean(
        [v for k, v in mean.items() if k not in hard])


def test_label_shift_rare_classes_more_frequent_in_target():
    def freq(domain, n=60):
        h = np.zeros(19)
        for i in range(n):
            lab, _ = T._scene(domain, np.random.default_rng([0, 9, i]), T.DOMAINS_V3[domain])
            h += np.bincount(lab[lab < 19], minlength=19)
        return h / h.sum()
    src, tgt = freq("gta5"), freq("cityscapes")
    for c in (T.PERSON, T.RIDER, T.BUS, T.TRUCK):
        assert tgt[c] >= 3 * src[c], (c, src[c], tgt[c])
    assert src[T.RIDER] < 0.0005  # near-absent in the GTA5-style source


def test_v2_unchanged():
    rng = np.random.default_rng([0, 0, 1])
    lab, _ = T._scene("gta5", rng)
    img = np.asarray(T._render(lab, T._style("gta5", 0), rng))
    # fixed when v3 was added: the v2 generator must keep producing the data the committed v2 numbers used
    assert hashlib.sha256(lab.tobytes() + img.tobytes()).hexdigest()[:16] == V2_DIGEST


V2_DIGEST = "d7042ed2e8d963b0"
