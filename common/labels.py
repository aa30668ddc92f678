"""Label tables: Cityscapes ids -> train ids, names, colours; SYNTHIA and CrossCity maps; 16/13-class
subsets. Everything here is data; no method-specific choice.

Sources: Cityscapes `labels.py` (cityscapesScripts) and the tables used by AdaptSegNet/ADVENT/MaxSquare
(see README "Datasets").
"""
import numpy as np

IGNORE_INDEX = 255

# (name, Cityscapes label id, train id, colour) for the 19 evaluated classes, in train-id order.
CITYSCAPES_CLASSES = [
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("pole", 17, 5, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
]
CLASS_NAMES_19 = [c[0] for c in CITYSCAPES_CLASSES]
PALETTE_19 = np.array([c[3] for c in CITYSCAPES_CLASSES], dtype=np.uint8)

# Cityscapes label id -> train id (GTA5 labels use the same ids). Every other id -> ignore.
CITYSCAPES_ID_TO_TRAINID = {c[1]: c[2] for c in CITYSCAPES_CLASSES}
GTA5_ID_TO_TRAINID = CITYSCAPES_ID_TO_TRAINID

# SYNTHIA-RAND-CITYSCAPES class id (R channel of GT/LABELS/*.png) -> train id (MaxSquare, MADAN).
# Ids 0 (void), 13 (parking-slot), 14 (road-work) and 22 (lanemarking) are ignored (SYNTHIA-RAND-CITYSCAPES README).
SYNTHIA_ID_TO_TRAINID = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18,
                         12: 17, 15: 6, 16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3}

# 16-class protocol (SYNTHIA -> Cityscapes): train ids kept, in order; terrain, truck, train ignored.
TRAINIDS_16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
# 13-class mIoU* drops wall, fence, pole. As 19-class train ids, and as indices in 16-class space.
TRAINIDS_13 = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
INDEX_13_IN_16 = [TRAINIDS_16.index(t) for t in TRAINIDS_13]  # [0,1,2,6,...,15]
# CrossCity (NTHU) uses exactly the 13 classes; its label PNGs carry Cityscapes ids.
CROSSCITY_ID_TO_13 = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10,
                      32: 11, 33: 12}


def label_id_lut(num_classes):
    """A lookup table class index (in the `num_classes` space) -> Cityscapes label id, the encoding of
    `*_gtFine_labelIds.png`, of GTA5 labels and of CrossCity's `*_eval.png` (what the Cityscapes benchmark
    server and cityscapesscripts read). Entries past the classes (ignore 255 included) map to 0 (unlabeled)."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[: num_classes] = [CITYSCAPES_CLASSES[t][1] for t in trainids_of(num_classes)]
    return lut


def class_names(num_classes):
    """Names of the classes in the given label space (19, 16 or 13)."""
    return [CLASS_NAMES_19[t] for t in trainids_of(num_classes)]


def trainids_of(num_classes):
    """19-class train ids that make up a label space of `num_classes` classes, in index order."""
    if num_classes == 19:
        return list(range(19))
    if num_classes == 16:
        return list(TRAINIDS_16)
    if num_classes == 13:
        return list(TRAINIDS_13)
    raise ValueError(f"num_classes must be 19, 16 or 13, got {num_classes}")


def palette(num_classes):
    return PALETTE_19[trainids_of(num_classes)]


def lut_from_map(mapping, num_classes=19, size=256):
    """A lookup table raw id -> class index in the `num_classes` space (255 = ignore).

    `mapping` maps raw ids to 19-class train ids (or, for CrossCity, straight to 13-class indices
    when num_classes == 13 and the map is CROSSCITY_ID_TO_13)."""
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    if mapping is CROSSCITY_ID_TO_13:
        if num_classes != 13:
            to_space = {t: i for i, t in enumerate(trainids_of(num_classes))}
            for raw, i13 in mapping.items():
                t19 = TRAINIDS_13[i13]
                if t19 in to_space:
                    lut[raw] = to_space[t19]
        else:
            for raw, i13 in mapping.items():
                lut[raw] = i13
        return lut
    to_space = {t: i for i, t in enumerate(trainids_of(num_classes))}
    for raw, t19 in mapping.items():
        if t19 in to_space:
            lut[raw] = to_space[t19]
    return lut


def colorize(label, num_classes=19):
    """HxW class-index array -> HxWx3 uint8 colour image (ignore = black)."""
    label = np.asarray(label)
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: num_classes] = palette(num_classes)
    return pal[label.astype(np.int64).clip(0, 255)]
