"""Every shipped protocol equals the reference it names (a Detectron2 model-zoo config or one
of MoCo's published configs), key by key over every leaf of Detectron2's get_cfg(), except
the deltas its entry in scrl_d2/transfer/protocols.py lists with their reasons."""
import os

import pytest

from scrl_d2.backend import detectron2_available
from scrl_d2.transfer.protocols import PROTOCOLS, get_protocol

pytestmark = pytest.mark.skipif(not detectron2_available(),
                                reason="Detectron2 is not installed (see docs/detectron2.md)")

from conftest import flat_items  # noqa: E402
from moco_configs import MOCO_CONFIGS  # noqa: E402


def d2_cfg():
    """Detectron2's get_cfg() plus our keys, as Detectron2's tools would run our configs."""
    from detectron2.config import get_cfg

    from scrl_d2.config import add_scrl_config

    cfg = get_cfg()
    add_scrl_config(cfg)
    return cfg


def shipped(p):
    cfg = d2_cfg()
    cfg.merge_from_file(p.config_path)
    return cfg


def reference(name: str):
    """A model-zoo file of the installed Detectron2, or MoCo's values over get_cfg()."""
    cfg = d2_cfg()
    if name.startswith("detectron2:"):
        import detectron2

        path = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs", name.split(":", 1)[1])
        assert os.path.isfile(path), f"{name}: not in the installed Detectron2 ({path})"
        cfg.merge_from_file(path)
        return cfg
    assert name in MOCO_CONFIGS, f"{name}: no such reference in tests/moco_configs.py"
    for layer in MOCO_CONFIGS[name]:
        cfg.merge_from_list([x for kv in layer.items() for x in kv])
    return cfg


def problems(ours, ref, deltas):
    """Undocumented differences (key, shipped, reference) and documented keys that do not differ."""
    a, b = dict(flat_items(ours)), dict(flat_items(ref))
    missing = "<absent>"
    differ = {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
              if a.get(k, missing) != b.get(k, missing)}
    out = [f"{k}: shipped {s!r}, reference {r!r} (not in the protocol's deltas)"
           for k, (s, r) in differ.items() if k not in deltas]
    out += [f"{k}: listed as a delta but equals the reference ({b.get(k, missing)!r})"
            for k in sorted(deltas) if k not in differ]
    return out


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_protocol_equals_its_reference_up_to_its_documented_deltas(name):
    p = get_protocol(name)
    assert p.reference, f"{name}: names no reference"
    assert all(why.strip() for why in p.deltas.values()), f"{name}: a delta without its reason"
    found = problems(shipped(p), reference(p.reference), p.deltas)
    assert not found, f"{name} vs {p.reference}:\n" + "\n".join(found)


def test_an_undocumented_difference_is_named_with_both_values():
    """MoCo's C4 COCO configs once trained at 800 only; MoCo's file says 640-800."""
    p = get_protocol("coco_mask_rcnn_R50_C4_2x")
    ours = shipped(p)
    ours.merge_from_list(["INPUT.MIN_SIZE_TRAIN", "(800,)"])
    found = problems(ours, reference(p.reference), p.deltas)
    assert found == ["INPUT.MIN_SIZE_TRAIN: shipped (800,), reference (640, 672, 704, 736, 768, 800) "
                     "(not in the protocol's deltas)"]


def test_a_listed_delta_that_does_not_differ_is_named():
    p = get_protocol("coco_faster_rcnn_R50_FPN_1x")
    found = problems(shipped(p), reference(p.reference), {**p.deltas, "SOLVER.BASE_LR": "stale"})
    assert found == ["SOLVER.BASE_LR: listed as a delta but equals the reference (0.02)"]


def test_retinanet_head_has_syncbn_with_per_level_statistics():
    """The shipped RetinaNet's head convs are normalised (the release's SyncBN rule); in this
    Detectron2 each conv's norm keeps one SyncBN's statistics per FPN level, with one affine
    and the conv weights shared across levels."""
    import torch
    from detectron2.layers import CycleBatchNormList
    from detectron2.modeling import build_model

    cfg = shipped(get_protocol("coco_retinanet_R50_FPN_1x"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    head = build_model(cfg).head
    levels = len(cfg.MODEL.RETINANET.IN_FEATURES)
    for subnet in (head.cls_subnet, head.bbox_subnet):
        norms = [m for m in subnet if isinstance(m, CycleBatchNormList)]
        assert len(norms) == cfg.MODEL.RETINANET.NUM_CONVS
        for n in norms:
            assert len(n) == levels and all(type(bn) is torch.nn.SyncBatchNorm and not bn.affine for bn in n)
