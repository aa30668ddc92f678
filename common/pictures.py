"""Pictures a person can read, drawn with Pillow (no plotting library): the prediction grid of every
evaluation, a class-colour legend, sheets of selected images (with their class content or scores),
selected regions outlined on their images, and class-histogram bar charts. Plumbing only: the method
folders decide what is shown (which images, which criterion, which colours); this module only draws.

    prediction_grid(rows, num_classes, path)          input | ground truth | prediction | errors, legend
    image_sheet(panels, num_classes, path, title)     tiles (image, class-content strip, caption) per panel
    region_sheet(items, colours, path, title)         regions outlined and tinted by criterion, legend
    class_histogram_chart(selected, reference, num_classes, path, title)   per-class shares, two bars

Every picture is written atomically (temp file + rename) and its (width, height) returned. The layout is
plain arithmetic on the constants below (the tests check it): a picture is PAD-separated tiles of width
TILE_W (height by the image's aspect ratio), LINE-high text lines, and a legend of LEGEND_COL-wide columns.
"""
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import labels as L

PAD = 4            # px around and between tiles
LINE = 14          # px per text line (title, captions, legend rows)
TILE_W = 224       # px width of one tile; the height follows the image's aspect ratio
LEGEND_COL = 124   # px per legend column (swatch + name)
SWATCH = 10        # px side of a legend swatch
STRIP = 8          # px height of a class-content strip
GRID_COLUMNS = ("input", "ground truth", "prediction", "errors")
WRONG = (255, 255, 255)   # errors column: wrong pixels (white on the darkened input)
HATCH = ((0, 0, 0), (96, 96, 96))  # errors column: ignored pixels (not scored), diagonal stripes
BAR_NAME_W, BAR_W, BAR_H = 104, 300, 10  # bar chart: name column, longest bar, height of one bar


def font():
    """Pillow's built-in font (FreeType Aileron 10 px where FreeType is available, else the bitmap font)."""
    return ImageFont.load_default()


def save_atomic(img, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    img.save(tmp, optimize=True)
    os.replace(tmp, path)
    return img.size


def tile_hw(hw, tile_w=TILE_W):
    """(height, width) of a tile showing an image of size hw."""
    return max(1, round(hw[0] * tile_w / hw[1])), tile_w


def _resize(arr, size_hw, nearest):
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize(
        (size_hw[1], size_hw[0]), Image.NEAREST if nearest else Image.BILINEAR))


def hatch(h, w, period=6):
    """HxWx3 diagonal stripes in the HATCH colours (the look of 'ignored, not scored')."""
    yy, xx = np.mgrid[:h, :w]
    return np.where((((yy + xx) // (period // 2)) % 2 == 0)[..., None], *[np.array(c, np.uint8) for c in HATCH])


def error_map(image, label, pred, ignore=L.IGNORE_INDEX):
    """HxWx3: the input in dark grey where the prediction is right, WRONG where it is wrong, hatched where
    the label is ignored. image HxWx3 uint8, label/pred HxW class indices, all the same size."""
    grey = (np.asarray(image, np.float32).mean(-1, keepdims=True) * 0.35).astype(np.uint8).repeat(3, -1)
    out = grey.copy()
    out[(pred != label) & (label != ignore)] = WRONG
    ign = label == ignore
    out[ign] = hatch(*label.shape)[ign]
    return out


def legend_entries(num_classes, extra=()):
    """[(name, colour)] of the classes of a label space, then the extra entries."""
    return list(zip(L.class_names(num_classes), map(tuple, L.palette(num_classes).tolist()))) + list(extra)


def legend_height(n_entries, width):
    cols = max(1, (width - PAD) // LEGEND_COL)
    return math.ceil(n_entries / cols) * LINE + PAD


def draw_legend(img, entries, y0):
    """Swatches with names in columns of LEGEND_COL px from y0; a colour 'hatch' draws the HATCH stripes."""
    d, f = ImageDraw.Draw(img), font()
    cols = max(1, (img.width - PAD) // LEGEND_COL)
    for k, (name, colour) in enumerate(entries):
        x, y = PAD + (k % cols) * LEGEND_COL, y0 + (k // cols) * LINE + 2
        if colour == "hatch":
            img.paste(Image.fromarray(hatch(SWATCH, SWATCH, 4)), (x, y))
        else:
            d.rectangle([x, y, x + SWATCH - 1, y + SWATCH - 1], fill=tuple(colour), outline=(160, 160, 160))
        d.text((x + SWATCH + 4, y - 1), name, fill=(0, 0, 0), font=f)


def grid_legend(num_classes):
    return legend_entries(num_classes, [("ignore (label 255)", (0, 0, 0)), ("error: wrong", WRONG),
                                        ("error: ignored", "hatch")])


def prediction_grid(rows, num_classes, path, tile_w=TILE_W):
    """One row per image: input | ground truth | prediction | errors, a caption (name, pixel accuracy,
    ignored share) above each row, the column titles on top and the class-colour legend below.
    rows: dicts with 'name', 'image' (HxWx3 uint8, any size), 'label' and 'pred' (HxW class indices,
    255 = ignore, the label's resolution). Tiles keep the label's aspect ratio. Returns (width, height)."""
    if not rows:
        return None
    th, tw = tile_hw(rows[0]["label"].shape, tile_w)
    width = PAD + len(GRID_COLUMNS) * (tw + PAD)
    entries = grid_legend(num_classes)
    height = LINE + len(rows) * (LINE + th + PAD) + legend_height(len(entries), width)
    img = Image.new("RGB", (width, height), "white")
    d, f = ImageDraw.Draw(img), font()
    for c, title in enumerate(GRID_COLUMNS):
        d.text((PAD + c * (tw + PAD), 1), title, fill=(0, 0, 0), font=f)
    for r, row in enumerate(rows):
        y = LINE + r * (LINE + th + PAD)
        lab, pred = np.asarray(row["label"]), np.asarray(row["pred"])
        valid = lab != L.IGNORE_INDEX
        acc = 100.0 * float((pred[valid] == lab[valid]).mean()) if valid.any() else float("nan")
        d.text((PAD, y + 1), f"{row['name']}   pixel acc {acc:.1f}%   ignored {100 * (1 - valid.mean()):.1f}%",
               fill=(0, 0, 0), font=f)
        lab_t, pred_t = _resize(lab.astype(np.uint8), (th, tw), True), _resize(pred.astype(np.uint8), (th, tw), True)
        image_t = _resize(np.asarray(row["image"], np.uint8), (th, tw), False)
        tiles = [image_t, L.colorize(lab_t, num_classes), L.colorize(pred_t, num_classes),
                 error_map(image_t, lab_t, pred_t)]
        for c, t in enumerate(tiles):
            img.paste(Image.fromarray(t), (PAD + c * (tw + PAD), y + LINE))
    draw_legend(img, entries, LINE + len(rows) * (LINE + th + PAD))
    return save_atomic(img, path)


def class_strip(label, num_classes, width, height=STRIP):
    """height x width x 3: the label's class shares (ignore excluded) as one stacked bar in class colours."""
    lab = np.asarray(label)
    counts = np.bincount(lab[lab != L.IGNORE_INDEX].ravel().astype(np.int64), minlength=num_classes)[:num_classes]
    out = np.full((height, width, 3), 255, np.uint8)
    if counts.sum() == 0:
        return out
    edges = np.round(np.cumsum(counts) / counts.sum() * width).astype(int)
    pal, x0 = L.palette(num_classes), 0
    for c, x1 in enumerate(edges):
        out[:, x0:x1] = pal[c]
        x0 = x1
    return out


def sheet_size(panels, tile_size, cols, strips, n_legend):
    """(width, height) of image_sheet's picture (see there)."""
    th, tw = tile_size
    width = PAD + cols * (tw + PAD)
    cell = th + (STRIP + 2 if strips else 0) + LINE + PAD
    height = LINE + sum(LINE + math.ceil(len(items) / cols) * cell for _, items in panels)
    return width, height + (legend_height(n_legend, width) if n_legend else 0)


def image_sheet(panels, num_classes, path, title="", cols=4, tile_w=TILE_W, legend=None):
    """A title line, then per panel a title line and its tiles, `cols` per row: the image, under it (when
    the item has a label) its class-content strip, then its caption; at the bottom the legend: `legend`
    [(name, colour)] if given, else the class colours when strips are shown. panels: [(panel title,
    [dict(image=HxWx3 uint8, caption=str, label=HxW or None)])]; all images are shown at the first image's
    aspect ratio. Returns (width, height), or None (nothing written) when no panel has an item (e.g. a round
    that selected nothing)."""
    first = next((it for _, items in panels for it in items), None)
    if first is None:
        return None
    th, tw = tile_hw(np.asarray(first["image"]).shape[:2], tile_w)
    strips = any(it.get("label") is not None for _, items in panels for it in items)
    entries = legend if legend is not None else (legend_entries(num_classes) if strips else [])
    width, height = sheet_size(panels, (th, tw), cols, strips, len(entries))
    cell = th + (STRIP + 2 if strips else 0) + LINE + PAD
    img = Image.new("RGB", (width, height), "white")
    d, f = ImageDraw.Draw(img), font()
    d.text((PAD, 1), title, fill=(0, 0, 0), font=f)
    y = LINE
    for ptitle, items in panels:
        d.text((PAD, y + 1), ptitle, fill=(0, 0, 0), font=f)
        y += LINE
        for k, it in enumerate(items):
            x, yy = PAD + (k % cols) * (tw + PAD), y + (k // cols) * cell
            img.paste(Image.fromarray(_resize(np.asarray(it["image"], np.uint8), (th, tw), False)), (x, yy))
            yy += th
            if strips:
                if it.get("label") is not None:
                    img.paste(Image.fromarray(class_strip(it["label"], num_classes, tw)), (x, yy + 1))
                yy += STRIP + 2
            d.text((x, yy + 1), str(it.get("caption", "")), fill=(0, 0, 0), font=f)
        y += math.ceil(len(items) / cols) * cell
    if entries:
        draw_legend(img, entries, y)
    return save_atomic(img, path)


def _edges(mask):
    """Pixels of mask with a 4-neighbour outside it (a 1-px inner outline)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner, inner


def outline_regions(image, regions, picked, colours, earlier=(), tint=0.35):
    """HxWx3: the image with each picked region tinted by and outlined (2 px) in its criterion's colour and
    the earlier labelled regions tinted grey. regions: HxW region ids (the image's size); picked:
    {region id: criterion}; colours: {criterion: (r, g, b)}, 'earlier' for the earlier regions."""
    out = np.asarray(image, np.float32).copy()
    todo = [(r, "earlier") for r in earlier if r not in picked] + list(picked.items())
    for r, crit in todo:
        m = regions == r
        col = np.array(colours[crit], np.float32)
        out[m] = (1 - tint) * out[m] + tint * col
        if crit != "earlier":
            e1, inner = _edges(m)
            out[e1 | _edges(inner)[0]] = col
    return out.clip(0, 255).astype(np.uint8)


def region_sheet(items, colours, path, title="", cols=3, tile_w=TILE_W):
    """Selected regions outlined on their images (outline_regions at tile size), a caption under each, the
    criterion colours as legend. items: dicts with image (HxWx3), regions (HxW ids, same size), picked
    {region: criterion}, earlier (region ids), caption. Returns (width, height)."""
    tiles = []
    for it in items:
        th, tw = tile_hw(np.asarray(it["image"]).shape[:2], tile_w)
        img = _resize(np.asarray(it["image"], np.uint8), (th, tw), False)
        reg = np.asarray(Image.fromarray(np.asarray(it["regions"]).astype(np.int32)).resize((tw, th), Image.NEAREST))
        tiles.append(dict(image=outline_regions(img, reg, it["picked"], colours, it.get("earlier", ())),
                          caption=it.get("caption", "")))
    return image_sheet([("", tiles)], 19, path, title, cols, tile_w, legend=list(colours.items()))


def wrap_text(text, f, width):
    """Words of text in lines no wider than width px (a single longer word gets its own line)."""
    lines, cur = [], ""
    for word in text.split():
        cand = (cur + " " + word).strip()
        if cur and f.getlength(cand) > width:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    return lines + [cur] if cur else lines or [""]


def class_histogram_chart(selected, reference, num_classes, path, title,
                          names=("selected pixels", "target train split (ground truth)")):
    """Per class, two horizontal bars: its share of the selected pixels (class colour) and its share of the
    reference pixels (grey), with the percentages. selected/reference: per-class pixel counts (ignore
    excluded). Rows: title, one line per bar name, one row per class. Returns (width, height)."""
    sel, ref = np.asarray(selected, np.float64), np.asarray(reference, np.float64)
    ps, pr = 100 * sel / max(sel.sum(), 1), 100 * ref / max(ref.sum(), 1)
    top = max(float(ps.max()), float(pr.max()), 1e-9)
    row = 2 * BAR_H + 6
    width = PAD + BAR_NAME_W + BAR_W + 50
    f = font()
    lines = wrap_text(title, f, width - 2 * PAD)
    t = len(lines)  # title lines
    height = (t + 2) * LINE + num_classes * row + PAD
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        d.text((PAD, 1 + k * LINE), line, fill=(0, 0, 0), font=f)
    x0, grey = PAD + BAR_NAME_W, (175, 175, 175)
    for k, (text, col) in enumerate(((f"{names[0]} ({int(sel.sum())} px), in the class colour", (60, 60, 60)),
                                     (names[1], grey))):
        d.rectangle([x0, (k + t) * LINE + 2, x0 + 20, (k + t) * LINE + 1 + BAR_H], fill=col)
        d.text((x0 + 24, (k + t) * LINE + 1), text, fill=(0, 0, 0), font=f)
    pal = L.palette(num_classes)
    for c, name in enumerate(L.class_names(num_classes)):
        y = (t + 2) * LINE + c * row
        d.text((PAD, y + 4), name, fill=(0, 0, 0), font=f)
        for k, (p, col) in enumerate(((ps[c], tuple(int(v) for v in pal[c])), (pr[c], grey))):
            yy = y + k * (BAR_H + 1)
            wbar = int(round(p / top * BAR_W))
            if wbar > 0:
                d.rectangle([x0, yy, x0 + wbar - 1, yy + BAR_H - 1], fill=col)
            d.text((x0 + wbar + 3, yy - 1), f"{p:.1f}%", fill=(0, 0, 0), font=f)
    return save_atomic(img, path)


def class_pixel_counts(dataset, indices=None):
    """Per-class pixel counts of the ground truth of `dataset` items (all by default; ignore excluded), via
    dataset.load_label (full-resolution labels). For pictures only: the selection never reads them."""
    k = dataset.num_classes
    counts = np.zeros(k, np.int64)
    for i in (range(len(dataset)) if indices is None else indices):
        lab = dataset.load_label(i)
        counts += np.bincount(lab[lab != L.IGNORE_INDEX].ravel().astype(np.int64), minlength=k)[:k]
    return counts


# -- the pictures of an active selection (MADA, D2ADA, SS-ADA call these from their selection steps) --
def dataset_tiles(dataset, indices, captions=None, with_labels=True):
    """image_sheet items of dataset images: the image file as stored, its ground truth (class content
    strip) when the dataset has labels, and a caption (default: the file name)."""
    from .datasets import read_image
    labelled = with_labels and getattr(dataset, "with_labels", False)
    return [dict(image=np.asarray(read_image(dataset.files[i][0])),
                 label=dataset.load_label(i) if labelled else None,
                 caption=_short(dataset.files[i][0]) if captions is None else captions[k])
            for k, i in enumerate(indices)]


def _short(path, n=38):
    """A file's stem without Cityscapes' _leftImg8bit, at most n characters (what fits under a tile): a longer
    one keeps its end (sequence and frame numbers tell images apart, the city prefix does not)."""
    stem = Path(path).stem
    stem = stem[: -len("_leftImg8bit")] if stem.endswith("_leftImg8bit") else stem
    return stem if len(stem) <= n else ".." + stem[-(n - 2):]


def _chart_path(path):
    return Path(path).with_name(Path(path).stem + "_classes.png")


def selection_pictures(dataset, chosen, path, title, captions=None, compare=None, compare_title="",
                       reference=None, n_show=12, cols=4):
    """An image-level selection as two pictures: PATH, the first n_show selected images (ground-truth class
    strip, caption) above, when `compare` is given, the first n_show of another set (e.g. a random draw of
    the same size); and PATH_classes.png, the class histogram of all selected images' labelled pixels
    against `reference` (per-class counts; default: the whole dataset's ground truth, read here). The
    ground truth is read for the pictures only. Returns the reference counts (to reuse across rounds)."""
    panels = [(f"selected: {len(chosen)} images" + (f" (first {n_show} shown)" if len(chosen) > n_show else ""),
               dataset_tiles(dataset, chosen[:n_show], None if captions is None else captions[:n_show]))]
    if compare is not None:
        panels.append((compare_title + (f" (first {n_show} shown)" if len(compare) > n_show else ""),
                       dataset_tiles(dataset, compare[:n_show])))
    image_sheet(panels, dataset.num_classes, path, title, cols)
    if not getattr(dataset, "with_labels", False):  # no ground truth: no class histogram
        return reference
    reference = class_pixel_counts(dataset) if reference is None else reference
    class_histogram_chart(class_pixel_counts(dataset, chosen), reference, dataset.num_classes, _chart_path(path),
                          title + ": class shares of the selected pixels vs the target")
    return reference


def region_selection_pictures(dataset, picks, regions_of, colours, path, title, earlier=None, n_show=6,
                              reference=None, cols=3):
    """A region-level selection as two pictures: PATH, the n_show images with the most picks, every picked
    region tinted and outlined in its criterion's colour (earlier labelled regions grey), a caption with the
    picks per criterion; and PATH_classes.png, the class histogram of all picked regions' labelled pixels
    against `reference` (default: the whole dataset's ground truth). picks: {image index: {region:
    criterion}}; regions_of(i): HxW region ids of image i at its label's size; earlier: {image index:
    region ids}. Returns the reference counts."""
    earlier = earlier or {}
    k = dataset.num_classes
    sel = np.zeros(k, np.int64)
    shown = sorted(picks, key=lambda i: (-len(picks[i]), i))[:n_show]
    items = []
    for i in sorted(picks):
        lab, reg = dataset.load_label(i), regions_of(i)
        m = np.isin(reg, list(picks[i])) & (lab != L.IGNORE_INDEX)
        sel += np.bincount(lab[m].astype(np.int64), minlength=k)[:k]
    for i in shown:
        counts = {}
        for crit in picks[i].values():
            counts[crit] = counts.get(crit, 0) + 1
        items.append(dict(image=np.asarray(dataset_tiles(dataset, [i], with_labels=False)[0]["image"]),
                          regions=regions_of(i), picked=picks[i], earlier=sorted(earlier.get(i, ())),
                          caption=", ".join(f"{n} {c}" for c, n in sorted(counts.items())) + " | " +
                          _short(dataset.files[i][0], 14)))
    if items:
        region_sheet(items, colours, path, title, cols)
    reference = class_pixel_counts(dataset) if reference is None else reference
    class_histogram_chart(sel, reference, k, _chart_path(path), title + ": class shares of the selected pixels vs the target")
    return reference
