"""The files D2ADA released, read into this folder's model and labelled set (issue 27, item 2).

- `checkpoint0X.tar` (the warm-up is `checkpoint00`, round X `checkpoint0X`): `{'model_state_dict':
  net.state_dict(), 'opt_state_dict'}` (agent/base_agent.py:160-165; the UDA warm-up's also `model_D`).
  Read by `from_d2ada` through `load_segmenter`.
- `datalist_0X.pkl` (region mode): pickle.dump of `{'src_label_im_idx', 'trg_label_im_idx', 'trg_pool_im_idx',
  'trg_label_suppix', 'trg_pool_suppix'}` (dataloader/region_active_dataset.py:53-63). Read by `read_datalist`
  through common.safe_pickle.load_pickle: nothing in the file is run.
- `datalist_0X.json` (image mode): the three `*_im_idx` lists (dataloader/active_dataset.py:24-32).

What the datalist keys mean (dataloader/region_dataset.py:54-61, region_active_dataset.py:17-45):
- `*_im_idx`: one entry per image, `[image path, label path, superpixel path]` (absolute, on the authors' disks);
  `src_label_im_idx` = the source images (all of them), `trg_label_im_idx` = target images with at least one
  labelled region, `trg_pool_im_idx` = target images with at least one unlabelled region (an image is in both
  while it is partly labelled).
- `trg_label_suppix` / `trg_pool_suppix`: superpixel path -> the region ids of that image that are labelled / still
  in the pool. The ids are those of D2ADA's own superpixel maps (fast_slic, `superpixel/train/CITY/*_superpixel.png`),
  so they mean the same regions only with those maps (d2ada/datalist.py import-superpixels puts them where
  this folder reads superpixels).
- Image mode: a target image in `trg_label_im_idx` is labelled whole (= all of its regions).
Our labelled-set state is `{target image index: set(region ids)}` (train_ada.py), the image matched by its path
relative to the dataset root (the longest tail of upstream's absolute path that names one of our images).

The model: VainF's DeepLabV3Plus-Pytorch as D2ADA builds it (models/segmentation/), renamed one to one onto
d2ada/model.py (DeepLabV3PlusD2ADA / DeepLabV2Feat):

    backbone.*                          -> backbone.*           (torchvision ResNet names; no fc, no avgpool)
    classifier.project.{0,1}.*          -> project.{0,1}.*      (48-channel layer1 projection, V3+)
    classifier.aspp.convs.{0..4}.*      -> aspp.{0..4}.*        (1x1, three 3x3, image pooling; V3+)
    classifier.aspp.project.{0,1}.*     -> aspp_project.{0,1}.*
    classifier.classifier.{0,1}.*       -> decoder.{0,1}.*      (the 3x3 conv giving the region feature)
    classifier.aspp.convs.{0..3}.0.weight -> aspp.{0..3}.weight (V2: four summed atrous convs)
    classifier.final.*                  -> classifier.*         (1x1 to the classes)

The model kind follows from the keys (`classifier.aspp.project` only in V3+), the classes from
`classifier.final.weight`, the depth from layer3's block count (6: ResNet-50, 23: ResNet-101); the output
stride is not in the file: upstream's default 16 (utils/common.py:111), which the released models used. The load
is strict: a key that no rule renames, or one the model lacks or misses, is an error naming the file and the keys.
"""
import json
import re
from pathlib import Path

from common import safe_pickle
from common.models import WeightLoadError, _check_and_load, resolve_checkpoint_format
from common.runtime import InputError
from d2ada.model import DeepLabV2Feat, DeepLabV3PlusD2ADA, from_checkpoint

FORMATS = ("auto", "ours", "d2ada")
FORMAT_HELP = ("format of the file: ours (this folder's model.pth / checkpointXX.pth), d2ada (D2ADA's released "
               "checkpoint0X.tar: warm-up 00 and rounds 01-05, DeepLabV3+ or DeepLabV2); auto: from the file's "
               "entries ('model' + 'config' = ours, 'model_state_dict' = d2ada). Loaded strictly (d2ada/releases.py)")
V3P_RULES = (("classifier.project.", "project."), ("classifier.aspp.convs.", "aspp."),
             ("classifier.aspp.project.", "aspp_project."), ("classifier.classifier.", "decoder."),
             ("classifier.final.", "classifier."), ("backbone.", "backbone."))
V2_RULES = (("classifier.final.", "classifier."), ("backbone.", "backbone."))
V2_ASPP = re.compile(r"classifier\.aspp\.convs\.(\d)\.0\.weight$")


def _keys_preview(keys, n=4):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def vainf_to_ours(sd, path="state dict"):
    """Rename a D2ADA (VainF) state dict to d2ada/model.py's keys (the table above). Returns (state dict, model
    name). A key no rule covers is an error naming it."""
    v3p = any(k.startswith("classifier.aspp.project.") for k in sd)
    out, unknown = {}, []
    for k, v in sd.items():
        m = None if v3p else V2_ASPP.match(k)
        if m:
            out[f"aspp.{m.group(1)}.weight"] = v
            continue
        for old, new in (V3P_RULES if v3p else V2_RULES):
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise WeightLoadError(f"{path}: keys that are not D2ADA's {'DeepLabV3+' if v3p else 'DeepLabV2'} layout: "
                              f"{_keys_preview(unknown, 6)} (see d2ada/releases.py)")
    return out, "deeplabv3plus" if v3p else "deeplabv2"


def _backbone(sd, path):
    blocks = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("backbone.layer3.")), default=-1)
    bottleneck = "backbone.layer1.0.conv3.weight" in sd
    name = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}.get(
        (bottleneck, blocks))
    if name is None:
        raise WeightLoadError(f"{path}: a ResNet whose layer3 has {blocks} {'bottleneck' if bottleneck else 'basic'} "
                              f"blocks; expected ResNet-101 (23) or ResNet-50 (6)")
    return name


def from_d2ada(state, path, output_stride=16):
    """D2ADA's checkpoint0X.tar ({'model_state_dict', 'opt_state_dict'}), or the bare state dict. Returns (our
    state dict, config)."""
    sd = state.get("model_state_dict", state) if isinstance(state, dict) else state
    if isinstance(sd, dict) and sd and all(k.startswith("module.") for k in sd):   # DataParallel's prefix
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not isinstance(sd, dict) or "classifier.final.weight" not in sd:
        raise WeightLoadError(f"{path} is not a D2ADA checkpoint: no model_state_dict with classifier.final.weight "
                              f"(it holds {_keys_preview(state if isinstance(state, dict) else [])})")
    ours, model = vainf_to_ours(sd, path)
    cfg = {"model": f"{model}_d2ada", "backbone": _backbone(sd, path),
           "num_classes": int(sd["classifier.final.weight"].shape[0]), "caffe_style": False, "multi_level": False,
           "two_branch": False, "norm": "imagenet", "output_stride": output_stride}
    return ours, cfg


def detect_format(state, path):
    """(format, why) from the file's entries; a WeightLoadError when neither."""
    if isinstance(state, dict) and "model" in state and "config" in state:
        return "ours", "it has 'model' and 'config' entries"
    if isinstance(state, dict) and ("model_state_dict" in state or "classifier.final.weight" in state
                                    or "module.classifier.final.weight" in state):
        return "d2ada", "a 'model_state_dict' entry (D2ADA's agent/base_agent.py)"
    raise WeightLoadError(f"{path}: not a format this folder reads (it holds "
                          f"{_keys_preview(state if isinstance(state, dict) else [])}); expected ours or d2ada")


def load_segmenter(path, fmt="auto"):
    """d2ada's segmenter from `path` in format `fmt` (FORMATS), loaded strictly. Returns (model, config, how),
    `how` a few words on the format used (and why, when auto-detected)."""
    fmt, state, how = resolve_checkpoint_format(
        path, fmt, FORMATS, lambda p: safe_pickle.load_torch(p, "a D2ADA checkpoint (ours, or D2ADA's released "
                                                                "checkpoint0X.tar)"), detect_format)
    if fmt == "ours":
        return (*from_checkpoint(path), how)
    sd, cfg = from_d2ada(state, path)
    net = (DeepLabV3PlusD2ADA if cfg["model"] == "deeplabv3plus_d2ada" else DeepLabV2Feat)(
        cfg["num_classes"], cfg["backbone"], cfg["output_stride"])
    _check_and_load(net, sd, path, f"{type(net).__name__} of the d2ada format ({cfg['backbone']}, renamed as in "
                    "d2ada/releases.py)")
    return net, cfg, how


# ------------------------------------------------------------------------------------------------
# Datalists: D2ADA's (region .pkl, image .json) and ours (.json)
# ------------------------------------------------------------------------------------------------
DATALIST_KEYS = ("src_label_im_idx", "trg_label_im_idx", "trg_pool_im_idx")


def _image_of(entry):
    """The image path of an *_im_idx entry: [image, label, superpixel] (D2ADA) or a name (ours)."""
    if isinstance(entry, str):
        return entry.split(",")[0]   # (density selection's joined key, should one have been stored)
    if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], str):
        return entry[0]
    raise ValueError(f"unexpected datalist entry {entry!r}")


def match_names(paths, names):
    """{path: index into names} for the paths whose longest tail (path components) is one of `names` (our image
    names, relative to the dataset root); unmatched paths are left out."""
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for p in paths:
        parts = Path(str(p).replace("\\", "/")).parts
        for k in range(len(parts)):
            tail = "/".join(parts[k:])
            if tail in index:
                out[p] = index[tail]
                break
    return out


def read_datalist(path):
    """A datalist as a dict: D2ADA's datalist_0X.pkl (read by common.safe_pickle.load_pickle: nothing in it is run)
    or .json, or ours (datalist_XX.json). Checks the keys; returns the dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"datalist not found: {path} (D2ADA's datalist_0X.pkl / .json, or ours datalist_XX.json)")
    if path.suffix == ".json":
        try:
            d = json.loads(path.read_text())
        except ValueError as e:
            raise InputError(f"{path} is not valid JSON ({e}); expected a datalist") from None
    else:
        d = safe_pickle.load_pickle(path, "a D2ADA datalist (a dict of image lists and region ids)")
    if not isinstance(d, dict) or any(k not in d for k in DATALIST_KEYS):
        have = ", ".join(map(repr, list(d)[:6])) if isinstance(d, dict) else type(d).__name__
        raise InputError(f"{path} is not a D2ADA datalist: it needs {', '.join(DATALIST_KEYS)} (it holds {have})")
    return d


def datalist_round(path, d):
    """The round whose selection the datalist holds (ours: 'round'; D2ADA: the XX of datalist_XX), or None."""
    if isinstance(d.get("round"), int):
        return d["round"]
    m = re.search(r"datalist_(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def labeled_from_any_datalist(d, names, src_names, inventory, path="datalist"):
    """Our labelled set {target image index: set(region ids)} from a datalist dict (read_datalist), and a summary.
    Region mode: the ids of trg_label_suppix; image mode (no suppix entries): every region of each labelled image.
    Every labelled target image must be one of `names`, and every region id must exist in its superpixel map
    (inventory: pixels per region of each image), else an InputError naming the datalist and the image."""
    lab_paths = [_image_of(e) for e in d["trg_label_im_idx"]]
    where = match_names(lab_paths, names)
    missing = [p for p in lab_paths if p not in where]
    if missing:
        raise InputError(f"{path}: {len(missing)} labelled target images are not images of the target training set "
                         f"(first: {missing[0]}); is --target-root the dataset the datalist was made for?")
    region_mode = "trg_label_suppix" in d and isinstance(d["trg_label_suppix"], dict)
    labeled = {}
    if region_mode:
        # superpixel path (D2ADA) or image name (ours) -> image index, through the [image, label, superpixel] entries
        key_to_image = {}
        for e in list(d["trg_label_im_idx"]) + list(d.get("trg_pool_im_idx", [])):
            img = _image_of(e)
            key_to_image[img] = img
            if isinstance(e, (list, tuple)) and len(e) >= 3:
                key_to_image[e[2]] = img
        where_all = match_names(set(key_to_image.values()), names)
        for key, ids in d["trg_label_suppix"].items():
            img = key_to_image.get(key, key)
            if img not in where_all:
                raise InputError(f"{path}: trg_label_suppix names {key!r}, which is not one of the target "
                                 f"training images")
            i = where_all[img]
            labeled.setdefault(i, set()).update(int(r) for r in ids)
    else:
        for p in lab_paths:
            labeled[where[p]] = set(range(len(inventory[where[p]])))
    for i, regions in labeled.items():
        bad = [r for r in regions if r >= len(inventory[i]) or inventory[i][r] == 0]
        if bad:
            raise InputError(f"{path}: region {bad[0]} of {names[i]} is not a region of its superpixel map "
                             f"({len(inventory[i])} ids): the datalist was made with other superpixel maps (D2ADA's "
                             f"fast_slic maps: python d2ada/datalist.py import-superpixels)")
    src = match_names([_image_of(e) for e in d["src_label_im_idx"]], src_names)
    summary = {"mode": "region" if region_mode else "image", "source_images": len(d["src_label_im_idx"]),
               "source_images_matched": len(src), "labeled_images": len(labeled),
               "labeled_regions": int(sum(len(r) for r in labeled.values())),
               "pool_images": len(d["trg_pool_im_idx"])}
    return labeled, summary
