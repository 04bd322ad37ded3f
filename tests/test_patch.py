"""mim_fast.patch: drop-in replacement of the authors' mask learners in a model built to the published
structure and parameter names (zengy268/MIM, modules/model.py, transcribed below without its global
config), and the state_dict converter between the authors' whole model and mim_fast.nn.MIM."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mim_fast import patch
from mim_fast.nn import MIM, ModalitySpec


# ---- the published modules (zengy268/MIM modules/model.py, transformer.py), config values as arguments ----
class HardConcrete(nn.Module):
    def __init__(self, beta=1 / 3, gamma=-0.2, zeta=1.0, fix_temp=True, loc_bias=3):
        super().__init__()
        self.temp = beta if fix_temp else nn.Parameter(torch.zeros(1).fill_(beta))
        self.gamma = gamma
        self.zeta = zeta
        self.gamma_zeta_ratio = math.log(-gamma / zeta)
        self.loc_bias = loc_bias

    def forward(self, input_element, summarize_penalty=True):
        input_element = input_element + self.loc_bias
        u = torch.empty_like(input_element).uniform_(1e-6, 1.0 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + input_element) / self.temp)
        penalty = torch.sigmoid(input_element - self.temp * self.gamma_zeta_ratio)
        s = s * (self.zeta - self.gamma) + self.gamma
        if summarize_penalty:
            penalty = penalty.mean()
        clipped_s = s.clamp(0, 1)
        hard_concrete = (clipped_s > 0.6).float()
        clipped_s = clipped_s + (hard_concrete - clipped_s).detach()
        return clipped_s, penalty


class MaskLearner(nn.Module):
    def __init__(self, d_l, sequence_length=50, activate=nn.Tanh()):
        super().__init__()
        self.d_l = d_l
        self.lstm = nn.LSTM(input_size=self.d_l, hidden_size=self.d_l // 2, num_layers=1, bidirectional=True)
        self.mask = HardConcrete()
        self.ratio = 5
        self.activate = activate
        self.pooler = nn.AdaptiveAvgPool1d(1)
        self.pooler2 = nn.Linear(self.d_l, 1)
        self.pooler3 = nn.Sequential(nn.Linear(self.d_l, self.d_l // 2), nn.ReLU(), nn.Linear(self.d_l // 2, 1),
                                     nn.ReLU())
        self.tanh = nn.Tanh()
        self.imp_ratio = nn.Sequential(nn.Linear(sequence_length, sequence_length // self.ratio), nn.ReLU(),
                                       nn.Linear(sequence_length // self.ratio, sequence_length))

    def forward(self, x):
        x_time, _ = self.lstm(x)
        x_time = self.pooler3(x_time.transpose(0, 1)).squeeze(2)
        x_time = self.imp_ratio(x_time)
        x_mask, penalty = self.mask(x_time)
        x_mask = x_mask.transpose(0, 1).unsqueeze(2)
        x_mask = torch.mul(x, x_mask)
        x_mask = self.pooler(self.activate(x_mask.permute(1, 2, 0))).squeeze(2)
        return x_mask, penalty


class Classifier(nn.Module):
    def __init__(self, d_l):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(d_l, 1))

    def forward(self, x):
        return self.classifier(x)


class Fusion(nn.Module):
    def __init__(self, d_l):
        super().__init__()
        self.classifier = Classifier(d_l)
        self.linear = nn.Linear(d_l * 3, d_l)
        self.linear_mul = nn.Linear(d_l, d_l)
        self.fusion = "multiplication"

    def forward(self, l, a, v):
        if self.fusion == "multiplication":
            out = torch.tanh(self.linear_mul(l * a * v))
        else:
            out = torch.tanh(self.linear(torch.cat([l, a, v], dim=-1)))
        return self.classifier(out)


class PublishedMHA(nn.Module):  # fairseq's MultiheadAttention: the parameters only
    def __init__(self, d):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.randn(3 * d, d) * 0.1)
        self.in_proj_bias = nn.Parameter(torch.randn(3 * d) * 0.1)
        self.out_proj = nn.Linear(d, d)


class PublishedLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = PublishedMHA(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(2)])


class PublishedPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("_float_tensor", torch.FloatTensor(1))


class PublishedTransformer(nn.Module):
    def __init__(self, d, layers):
        super().__init__()
        self.embed_positions = PublishedPositions()
        self.layers = nn.ModuleList([PublishedLayer(d) for _ in range(layers)])
        self.register_buffer("version", torch.Tensor([2]))
        self.layer_norm = nn.LayerNorm(d)


class Encoder(nn.Module):
    def __init__(self, p, d_in, d, layers):
        super().__init__()
        setattr(self, "proj_" + p, nn.Conv1d(d_in, d, kernel_size=3, padding=1, bias=False))
        if layers:
            setattr(self, "trans" + p, PublishedTransformer(d, layers))


class PublishedMIM(nn.Module):
    """The published MIM's attribute structure (text as 768-d features: no BERT inside)."""

    def __init__(self, d=10, T=10, dims=(12, 7, 5), layers=2):
        super().__init__()
        self.l_encoder = Encoder("l", dims[0], d, 0)
        self.a_encoder = Encoder("a", dims[1], d, layers)
        self.v_encoder = Encoder("v", dims[2], d, layers)
        self.l_mask = MaskLearner(d, sequence_length=T)
        self.a_mask = MaskLearner(d, sequence_length=T)
        self.v_mask = MaskLearner(d, sequence_length=T)
        self.l_classifier = Classifier(d)
        self.a_classifier = Classifier(d)
        self.v_classifier = Classifier(d)
        self.fusion = Fusion(d)


def mim_fast_model(d=10, T=10, dims=(12, 7, 5), layers=2, fusion="multiplication"):
    return MIM([ModalitySpec("text", "features", dims[0], T), ModalitySpec("audio", "features", dims[1], T, layers),
                ModalitySpec("vision", "features", dims[2], T, layers)], d_model=d, heads=2, fusion=fusion)


# ---------------------------------------------------------------------------------------------- patching
def test_patch_keeps_the_call_contract_parameters_and_numbers():
    torch.manual_seed(0)
    model = PublishedMIM()
    before = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # built before the patch, as a user's would be
    reference = {n: MaskLearner(10, sequence_length=10) for n in ("l", "a", "v")}
    for n, r in reference.items():
        r.load_state_dict(getattr(model, n + "_mask").state_dict())
    state = torch.random.get_rng_state()
    assert patch.apply_mim_fast(model) == ["l_mask", "a_mask", "v_mask"]
    assert torch.equal(torch.random.get_rng_state(), state)  # patching draws nothing from the RNG
    assert all(isinstance(getattr(model, n + "_mask"), patch.PublishedMaskLearner) for n in "lav")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # same objects

    x = torch.randn(10, 4, 10, requires_grad=True)  # (T, B, d), sequence-first as published
    for n in "lav":
        torch.manual_seed(7)
        k_ref, p_ref = reference[n](x)
        torch.manual_seed(7)
        u = torch.empty(4, 10).uniform_(1e-6, 1 - 1e-6)  # the noise the published forward drew
        k, p = getattr(model, n + "_mask")(x, noise=u)  # the published call, plus the same noise
        torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
        mine = getattr(model, n + "_mask")
        g_ref = torch.autograd.grad(k_ref.pow(2).sum() + p_ref, [x] + list(reference[n].parameters()),
                                    allow_unused=True)
        g = torch.autograd.grad(k.pow(2).sum() + p, [x] + list(mine.parameters()), allow_unused=True)
        for a, b in zip(g, g_ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    k, p = model.l_mask(x)  # no noise given: drawn per call, as published
    k.sum().backward()
    opt.step()  # the optimizer built before the patch still trains the mask learners


def test_eval_samples_unless_asked_and_errors():
    torch.manual_seed(1)
    model = PublishedMIM().eval()
    patch.apply_mim_fast(model)
    x = torch.randn(10, 64, 10)
    assert model.l_mask.mask.mode == "sample"  # published: HardConcrete has no eval branch
    gates = [model.l_mask.gate_logits(x) for _ in range(2)]
    assert torch.equal(gates[0], gates[1])
    a, b = model.l_mask(x), model.l_mask(x)
    assert not torch.equal(a.pooled, b.pooled)  # fresh noise per call
    det = PublishedMIM().eval()
    patch.apply_mim_fast(det, eval_gate="expected")
    assert torch.equal(det.a_mask(x).pooled, det.a_mask(x).pooled)
    odd = PublishedMIM()
    for n in "lav":
        getattr(odd, n + "_mask").activate = nn.Softplus()
    with pytest.raises(ValueError, match="cannot tell the pooling activation"):
        patch.apply_mim_fast(odd)
    assert patch.apply_mim_fast(odd, activation="relu") == ["l_mask", "a_mask", "v_mask"]
    with pytest.raises(ValueError, match="no published MaskLearner"):
        patch.apply_mim_fast(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="is itself a published MaskLearner"):
        patch.apply_mim_fast(MaskLearner(10, 10))


# ---------------------------------------------------------------------------------------------- state dicts
def test_state_dict_converts_to_mim_fast_and_back():
    torch.manual_seed(2)
    published = PublishedMIM()
    sd = published.state_dict()
    converted = patch.published_to_mim_fast(sd)
    model = mim_fast_model()
    assert sorted(converted) == sorted(model.state_dict())
    patch.load_published_state_dict(model, sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, converted[k]), k
    # the mapped parts compute what the published ones do
    ks = [torch.randn(3, 10) for _ in range(3)]
    torch.testing.assert_close(model.fusion(ks).unsqueeze(-1), published.fusion(*ks))
    torch.testing.assert_close(model.heads["audio"](ks[1]), published.a_classifier(ks[1]))
    t = model.encoders["audio"].transformer.layers[1]
    assert torch.equal(t.linear1.weight, published.a_encoder.transa.layers[1].fc1.weight)
    assert torch.equal(t.norm2.bias, published.a_encoder.transa.layers[1].layer_norms[1].bias)
    assert torch.equal(model.encoders["text"].proj.weight, published.l_encoder.proj_l.weight)
    # and back: the published model loads it; only the inactive concat layer has no counterpart
    back = patch.mim_fast_to_published(model.state_dict())
    fresh = PublishedMIM()
    missing, unexpected = fresh.load_state_dict(back, strict=False)
    assert sorted(missing) == ["fusion.linear.bias", "fusion.linear.weight"] and unexpected == []
    for k, v in back.items():
        assert torch.equal(fresh.state_dict()[k], v), k
        if k in sd and not k.endswith("_float_tensor"):
            assert torch.equal(sd[k], v), k


def test_concat_fusion_maps_its_own_layer():
    published = PublishedMIM()
    published.fusion.fusion = "concat"
    model = mim_fast_model(fusion="concat")
    patch.load_published_state_dict(model, published.state_dict())
    ks = [torch.randn(3, 10) for _ in range(3)]
    torch.testing.assert_close(model.fusion(ks).unsqueeze(-1), published.fusion(*ks))
    back = patch.mim_fast_to_published(model.state_dict())
    assert "fusion.linear.weight" in back and "fusion.linear_mul.weight" not in back


def test_concat_fusion_in_another_modality_order():
    """Found by a review against the authors' code: the released Fusion concatenates text, audio, vision;
    a mim_fast MIM over the same modalities declared in another order concatenates in its own order. The
    converted weight's column blocks follow it (the shapes agree, so a plain copy would load silently and
    read each modality with another's weights), and the conversion back restores the published order."""
    torch.manual_seed(0)
    published = PublishedMIM()
    published.fusion.fusion = "concat"
    d, T, dims = 10, 10, dict(text=12, audio=7, vision=5)
    order = ("audio", "vision", "text")
    model = MIM([ModalitySpec(m, "features", dims[m], T, 0 if m == "text" else 2) for m in order], d_model=d,
                heads=2, fusion="concat")
    patch.load_published_state_dict(model, published.state_dict())
    ks = {m: torch.randn(3, d) for m in ("text", "audio", "vision")}
    torch.testing.assert_close(model.fusion([ks[m] for m in order]).unsqueeze(-1),
                               published.fusion(ks["text"], ks["audio"], ks["vision"]))
    back = patch.mim_fast_to_published(model.state_dict())
    assert torch.equal(back["fusion.linear.weight"], published.state_dict()["fusion.linear.weight"])
    with pytest.raises(ValueError, match="modalities must order text, audio and vision"):
        patch.published_to_mim_fast(published.state_dict(), fusion="concat", modalities=("text", "audio"))


def test_errors_list_the_keys_that_do_not_fit():
    sd = PublishedMIM().state_dict()
    bad = dict(sd, **{"extra.weight": torch.zeros(1)},
               **{"l_encoder.bert.encoder.layer.%d.weight" % i: torch.zeros(1) for i in range(12)})
    with pytest.raises(ValueError, match=r"cannot map 13 keys .*text='bert'.*extra\.weight.*"
                                         r"l_encoder\.bert\.encoder\.layer\.11\.weight"):
        patch.published_to_mim_fast(bad)
    with pytest.raises(ValueError, match=r"shapes differ .*masks\.text\.lstm"):
        patch.load_published_state_dict(mim_fast_model(d=12), sd)  # another width
    with pytest.raises(ValueError, match=r"the published state_dict lacks "
                                         r"encoders\.audio\.transformer\.layers\.2\.\* \(12 keys\)"):
        patch.load_published_state_dict(mim_fast_model(layers=3), sd)  # a layer more than the checkpoint
    words = MIM([ModalitySpec("text", "words", 30, 10), ModalitySpec("audio", "features", 7, 10),
                 ModalitySpec("vision", "features", 5, 10)], d_model=10)
    with pytest.raises(ValueError, match="cannot map .*encoders.text.embed.weight"):
        patch.mim_fast_to_published(words.state_dict())
    with pytest.raises(ValueError, match="tensor fusion has no published counterpart"):
        patch.mim_fast_to_published(mim_fast_model(d=4, fusion="tensor").state_dict())
