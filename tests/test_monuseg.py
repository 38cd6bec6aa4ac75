"""The nuclei-he recipe's data rules (recipes.monuseg): the fixed held-out split holds out
whole tiles, one per organ, and the 3-class labels keep touching nuclei apart."""

from __future__ import annotations

import numpy as np
import pytest

from recipes.monuseg import instances_of, monuseg_split, organ, three_class

# the 30 MoNuSeg 2018 training tiles, as the shared data folder names them
TILES = """TCGA-18-5592-01Z-00-DX1 TCGA-21-5784-01Z-00-DX1 TCGA-21-5786-01Z-00-DX1 TCGA-38-6178-01Z-00-DX1
TCGA-49-4488-01Z-00-DX1 TCGA-50-5931-01Z-00-DX1 TCGA-A7-A13E-01Z-00-DX1 TCGA-A7-A13F-01Z-00-DX1
TCGA-AR-A1AK-01Z-00-DX1 TCGA-AR-A1AS-01Z-00-DX1 TCGA-AY-A8YK-01A-01-TS1 TCGA-B0-5698-01Z-00-DX1
TCGA-B0-5710-01Z-00-DX1 TCGA-B0-5711-01Z-00-DX1 TCGA-CH-5767-01Z-00-DX1 TCGA-DK-A2I6-01A-01-TS1
TCGA-E2-A14V-01Z-00-DX1 TCGA-E2-A1B5-01Z-00-DX1 TCGA-G2-A2EK-01A-02-TSB TCGA-G9-6336-01Z-00-DX1
TCGA-G9-6348-01Z-00-DX1 TCGA-G9-6356-01Z-00-DX1 TCGA-G9-6362-01Z-00-DX1 TCGA-G9-6363-01Z-00-DX1
TCGA-HE-7128-01Z-00-DX1 TCGA-HE-7129-01Z-00-DX1 TCGA-HE-7130-01Z-00-DX1 TCGA-KB-A93J-01A-01-TS1
TCGA-NH-A8F7-01A-01-TS1 TCGA-RD-A8N9-01A-01-TS1""".split()


def test_the_split_holds_out_one_whole_tile_per_organ_whatever_the_order():
    train, held = monuseg_split(TILES)
    assert len(TILES) == 30 and len(held) == 7 and not set(train) & set(held)
    assert sorted(organ(n) for n in held) == sorted({organ(n) for n in TILES})  # each organ once
    assert monuseg_split(TILES[::-1]) == (train, held)
    with pytest.raises(ValueError, match="TCGA-ZZ"):
        organ("TCGA-ZZ-0000-01Z-00-DX1")


def test_three_classes_keep_touching_nuclei_apart():
    mask = np.zeros((12, 20), np.uint8)
    mask[3:9, 2:9] = 255
    mask[3:9, 10:17] = 255  # a one-pixel gap at column 9: the removed boundary
    labels = three_class(mask)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert (labels[3:9, 9] == 2).all()  # the gap is boundary
    assert (labels[mask > 0] == 1).all() and labels[0, 0] == 0
    assert instances_of(mask).max() == 2
