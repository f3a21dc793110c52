"""Every speed option trains the same method: over a few steps from the same weights
and batches, the losses equal the plain path's (within mixed-precision tolerance)."""
import copy

import pytest
import torch
from conftest import remove_unless_failed, tiny_cfg

from scrl_d2.engine.trainer import PretrainTrainer

STEPS = 3


def _losses(cfg, state, batches):
    torch.manual_seed(0)
    trainer = PretrainTrainer(cfg)
    trainer.model.load_state_dict(state)
    out = []
    for b in batches:
        trainer.run_step(copy.deepcopy(b), 0.0)
        trainer.iter += 1
        out.append(float(trainer.pop_window()[-1]["values"]["loss"]))
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory, image_folder, request):
    d = tmp_path_factory.mktemp("plain")
    cfg = tiny_cfg(f"classes:{image_folder}", out=str(d))
    trainer = PretrainTrainer(cfg)
    state = copy.deepcopy(trainer.model.state_dict())
    it = iter(trainer.loader)
    batches = [next(it) for _ in range(STEPS)]
    yield cfg, state, batches, _losses(cfg, state, batches)
    remove_unless_failed(request, d)


@pytest.mark.parametrize("opts,rtol", [
    (["MODEL.CHANNELS_LAST", "True"], 1e-3),
    (["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16"], 5e-2),
    (["SOLVER.AMP.ENABLED", "True", "MODEL.CHANNELS_LAST", "True"], 5e-2),
    # aot_eager traces forward and backward as torch.compile does, without a C++ toolchain
    (["MODEL.COMPILE.ENABLED", "True", "MODEL.COMPILE.BACKEND", "aot_eager"], 1e-3),
    (["DATALOADER.PIN_MEMORY", "False"], 0.0),
], ids=["channels_last", "bf16", "bf16+channels_last", "compile", "unpinned"])
def test_speed_option_gives_the_plain_loss(plain, opts, rtol, tmp_path):
    cfg, state, batches, reference = plain
    cfg = cfg.clone()
    cfg.merge_from_list(opts + ["OUTPUT_DIR", str(tmp_path)])
    losses = _losses(cfg, state, batches)
    assert losses[0] != losses[-1]  # training moved the weights
    for got, want in zip(losses, reference):
        assert abs(got - want) <= rtol * abs(want) + 1e-6, (opts, losses, reference)


def test_plain_path_is_deterministic(plain, tmp_path):
    cfg, state, batches, reference = plain
    cfg = cfg.clone()
    cfg.merge_from_list(["OUTPUT_DIR", str(tmp_path)])
    assert _losses(cfg, state, batches) == reference
