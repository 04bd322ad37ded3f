"""torch.export of the MIM model and the modules: every output NamedTuple is registered for serialization,
an exported program saved here loads in a fresh process (after ``import mim_fast``) and gives the same
outputs; ``mim_fast.load_exported`` does both steps."""
import os
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree

import mim_fast
from mim_fast._types import KGSLossOutput, PurifyGateOutput
from mim_fast.nn import MIM, EncoderOutput, MaskLearner, MaskLearnerOutput, MIMOutput, ModalitySpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD = r"""
import sys, torch
import mim_fast  # registers mim_fast's ops and output types: what torch.export.load needs
path, inputs_path, expected_path = sys.argv[1:]
ep = torch.export.load(path)
args, kwargs = torch.load(inputs_path)
out = ep.module()(*args, **kwargs)
name, ref = torch.load(expected_path)
assert type(out).__name__ == name, (type(out), name)
flat, _ = torch.utils._pytree.tree_flatten(out)
assert len(flat) == len(ref)
for a, b in zip(flat, ref):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
print("same outputs:", type(out).__name__, len(flat), "tensors")
"""


def test_every_output_type_is_registered_for_serialization():
    for cls in (MIMOutput, MaskLearnerOutput, EncoderOutput, PurifyGateOutput, KGSLossOutput):
        assert pytree.SUPPORTED_SERIALIZED_TYPES[cls].serialized_type_name == "%s.%s" % (cls.__module__,
                                                                                          cls.__qualname__)


def _model():
    specs = [ModalitySpec("text", "features", 12, 9), ModalitySpec("audio", "features", 7, 9, layers=1),
             ModalitySpec("vision", "features", 5, 9, layers=1)]
    model = MIM(specs, d_model=10, heads=2).eval()
    B = 4
    inputs = {"text": torch.randn(B, 9, 12), "audio": torch.randn(B, 9, 7), "vision": torch.randn(B, 9, 5)}
    lengths = {"audio": torch.tensor([9, 3, 1, 9]), "text": torch.full((B,), 9), "vision": torch.full((B,), 9)}
    return model, (inputs, lengths), {}


def _mask_learner():
    m = MaskLearner(8, seq_len=10, ratio=2).eval()
    return m, (torch.randn(10, 3, 8),), {}


@pytest.mark.parametrize("build", [_model, _mask_learner], ids=["MIM", "MaskLearner"])
def test_save_then_load_in_a_fresh_process_gives_the_same_outputs(tmp_path, build):
    model, args, kwargs = build()
    with torch.no_grad():
        expected = model(*args, **kwargs)
    ep = torch.export.export(model, args, kwargs)
    path = str(tmp_path / "program.pt2")
    torch.export.save(ep, path)
    torch.save((args, kwargs), tmp_path / "inputs.pt")
    torch.save((type(expected).__name__, pytree.tree_leaves(expected)), tmp_path / "expected.pt")
    res = subprocess.run([sys.executable, "-c", LOAD, path, str(tmp_path / "inputs.pt"), str(tmp_path / "expected.pt")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "same outputs: %s" % type(expected).__name__ in res.stdout
    loaded = mim_fast.load_exported(path)  # the helper: imports what is needed, then torch.export.load
    out = loaded.module()(*args, **kwargs)
    for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_forward_seed_keys_noise_by_global_sample_index():
    """MIM.forward(seed=, index=): a sample's gate noise and dropout masks follow its global index, so a
    batch split in two gives the whole batch's outputs (row for row)."""
    model, (inputs, lengths), _ = _model()
    model.train()
    index = torch.tensor([40, 7, 19, 3])
    whole = model(inputs, lengths, seed=11, index=index)
    for part in (slice(0, 1), slice(1, 4)):
        sub = model({k: v[part] for k, v in inputs.items()}, {k: v[part] for k, v in lengths.items()}, seed=11,
                    index=index[part])
        torch.testing.assert_close(sub.prediction, whole.prediction[part], rtol=1e-5, atol=1e-6)
        for g, w in zip(sub.gates, whole.gates):
            assert torch.equal(g, w[part])
    other = model(inputs, lengths, seed=11, index=index + 1)
    assert not all(torch.equal(a, b) for a, b in zip(other.gates, whole.gates))
    # the trainer's precomputed noise is the model's own
    from mim_fast import train as T

    batch = T.Batch(inputs, lengths, torch.zeros(4), index, None)
    given = model(inputs, lengths, noise=T._noise(model, batch, 11), seed=11, index=index)
    assert torch.equal(given.prediction, whole.prediction)
