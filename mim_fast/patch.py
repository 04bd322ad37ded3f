"""Drop-in use of mim_fast in a model written against the authors' code (github zengy268/MIM), in the manner
of Liger-Kernel's ``apply_liger_kernel_to_*``: patch an existing model in place, keep its call sites.

* :func:`apply_mim_fast` replaces every published ``MaskLearner`` (``model.l_mask``, ``a_mask``,
  ``v_mask``) by a :class:`PublishedMaskLearner`: mim_fast's fused gate and pooling, the same parameter
  objects (an optimizer built before the patch keeps working), the same call contract
  ``k, p = self.l_mask(x)`` (two return values), and — as published — sampled gates in eval mode too
  unless ``eval_gate="expected"`` is asked for.
* :func:`published_to_mim_fast` / :func:`mim_fast_to_published` map the authors' whole-model state_dict
  (``l_mask``/``a_mask``/``v_mask``, ``l_classifier.classifier.0``, ``fusion.linear_mul``, the encoders'
  ``proj_a``, ``transa.layers.N.fc1``, ...) onto :class:`mim_fast.nn.MIM`'s keys and back;
  :func:`load_published_state_dict` loads one into a MIM and says exactly what does not fit. A key that
  cannot be mapped is an error that lists it; keys that the released forward never reads are dropped and
  listed in :data:`UNUSED_PUBLISHED`.

Weights map one to one (a concat fusion's weight with its column blocks in the model's modality order);
what the two models compute differs where mim_fast's MIM does (its docstrings and README list the
deviations), e.g. mim_fast's sinusoidal positions start at 0 where the released fairseq embedding starts at
1, and give every step a position where the released embedding gives none to a step whose first feature is
exactly 0 (fairseq's padding test; after the bias-free Conv1d, a zero-padded step), so a converted model's
encoders differ on zero-padded steps; and the released BERT encoder drops the [CLS] step.
"""
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ._types import exportable
from .nn.purification import MaskLearner

__all__ = ["PublishedMaskLearner", "MaskLearnerPair", "apply_mim_fast", "published_to_mim_fast",
           "mim_fast_to_published", "load_published_state_dict", "UNUSED_PUBLISHED"]

MODALITIES = (("l", "text"), ("a", "audio"), ("v", "vision"))


@exportable
class MaskLearnerPair(NamedTuple):
    """What the published ``MaskLearner.forward`` returns: ``k, p = mask_learner(x)``.

    pooled:  (B, d) the purified representation (1/T)·Σ_t φ(x[t]·z[t]).
    penalty: () the mean expected-L0 penalty of the gate.
    """

    pooled: torch.Tensor
    penalty: torch.Tensor


class PublishedMaskLearner(MaskLearner):
    """:class:`mim_fast.nn.MaskLearner` with the published call contract: ``forward(x)`` → (pooled,
    penalty) as a :class:`MaskLearnerPair`. x: (T, B, d) sequence-first, as published. The gate noise is
    drawn from torch's default generator per call (as the published ``uniform_`` does; the numbers differ,
    the distribution is the same) unless ``noise=`` (B, T) or ``seed=`` is given."""

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None, *, noise: Optional[torch.Tensor] = None,
                seed: Optional[int] = None, offset: int = 0) -> MaskLearnerPair:
        out = super().forward(x, lengths, noise=noise, seed=seed, offset=offset)
        return MaskLearnerPair(out.pooled, out.penalty)

    @classmethod
    def from_published(cls, module: nn.Module, *, activation: Optional[str] = None, eval_gate: str = "sample",
                       backend: str = "auto") -> "PublishedMaskLearner":
        """A PublishedMaskLearner computing what the published ``module`` computes, holding its very
        ``lstm``/``pooler2``/``pooler3``/``imp_ratio`` submodules (same parameter objects) and its gate's
        hyper-parameters (``mask.temp``, ``gamma``, ``zeta``, ``loc_bias``; threshold 0.6, hard-coded in
        the published forward). ``activation``: φ of the pooling, read from ``module.activate`` when it is a
        tanh/ReLU/identity (the published ``config.activate``), else required."""
        problem = _not_published_mask_learner(module)
        if problem:
            raise TypeError("%s is not the published MaskLearner: %s" % (type(module).__name__, problem))
        act = activation or _activation_name(getattr(module, "activate", None))
        if act is None:
            raise ValueError("cannot tell the pooling activation from %r: pass activation='tanh', 'relu' or "
                             "'identity'" % (getattr(module, "activate", None),))
        gate = module.mask
        if isinstance(gate.temp, torch.Tensor):
            raise ValueError("the published gate has a learned temperature (fix_temp=False): mim_fast's gate has a "
                             "fixed beta")
        seq_len = module.imp_ratio[0].in_features
        hidden = module.imp_ratio[0].out_features
        ratio = getattr(module, "ratio", None)
        if not isinstance(ratio, int) or seq_len // ratio != hidden:
            ratio = next((r for r in range(1, seq_len + 1) if seq_len // r == hidden), None)
        if ratio is None:
            raise ValueError("imp_ratio maps %d -> %d steps: no ratio T // r gives that" % (seq_len, hidden))
        with torch.device("meta"):  # no memory, no draw from the RNG: every parameterized part is replaced
            new = cls(module.lstm.input_size, seq_len, ratio, activation=act, eval_mode=eval_gate, backend=backend,
                      beta=float(gate.temp), gamma=float(gate.gamma), zeta=float(gate.zeta),
                      loc_bias=float(gate.loc_bias), threshold=0.6)
        for name in ("lstm", "pooler2", "pooler3", "imp_ratio"):
            setattr(new, name, getattr(module, name))
        new.train(module.training)
        return new


def _not_published_mask_learner(m: nn.Module) -> Optional[str]:
    """None if ``m`` has the published MaskLearner's structure, else what is missing."""
    if isinstance(m, MaskLearner):
        return "it is mim_fast's already"
    for name, kind in (("lstm", nn.LSTM), ("pooler2", nn.Linear), ("pooler3", nn.Sequential),
                       ("imp_ratio", nn.Sequential), ("mask", nn.Module)):
        if not isinstance(getattr(m, name, None), kind):
            return "no %s submodule %r" % (kind.__name__, name)
    if m.lstm.batch_first or not m.lstm.bidirectional or m.lstm.num_layers != 1:
        return "its LSTM is not the published one (1 layer, bidirectional, sequence-first)"
    if not all(hasattr(m.mask, a) for a in ("temp", "gamma", "zeta", "loc_bias")):
        return "its gate has no temp/gamma/zeta/loc_bias (the published HardConcrete's)"
    return None


def _activation_name(fn) -> Optional[str]:
    if isinstance(fn, nn.Tanh) or fn in (torch.tanh, torch.nn.functional.tanh):
        return "tanh"
    if isinstance(fn, nn.ReLU) or fn in (torch.relu, torch.nn.functional.relu):
        return "relu"
    if isinstance(fn, nn.Identity):
        return "identity"
    return None


def apply_mim_fast(model: nn.Module, *, activation: Optional[str] = None, eval_gate: str = "sample",
                   backend: str = "auto") -> List[str]:
    """Replace, in place, every submodule of ``model`` that is a published ``MaskLearner`` (by structure:
    ``lstm``, ``mask`` (HardConcrete), ``pooler2``, ``pooler3``, ``imp_ratio``) with a
    :class:`PublishedMaskLearner` holding the same parameters; returns the replaced names (e.g.
    ``["l_mask", "a_mask", "v_mask"]``). Call sites keep working: ``k, p = self.l_mask(x)``.

    eval_gate: "sample" (published: the gates are sampled in eval mode too) or "expected" (deterministic
    σ(g + loc_bias) in eval). activation, backend: see :meth:`PublishedMaskLearner.from_published`.
    ValueError if ``model`` holds no published MaskLearner (or is one: patch its parent).
    """
    if _not_published_mask_learner(model) is None:
        raise ValueError("model is itself a published MaskLearner: patch the model that holds it, or use "
                         "PublishedMaskLearner.from_published(model)")
    found = [(name, m) for name, m in model.named_modules() if name and _not_published_mask_learner(m) is None]
    if not found:
        raise ValueError("no published MaskLearner in %s (looked for submodules with lstm, mask, pooler2, pooler3, "
                         "imp_ratio)" % type(model).__name__)
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = PublishedMaskLearner.from_published(m, activation=activation, eval_gate=eval_gate, backend=backend)
        setattr(parent, child, new)
    return [name for name, _ in found]


# ---------------------------------------------------------------------------------------------- state dicts
# (published key template, mim_fast key template); {p} is l/a/v, {m} text/audio/vision; {i} a layer number
# and {rest} the rest of the key are carried over. TEXT_PROJ depends on mim_fast's text encoder kind.
_RULES = [
    ("{p}_mask.{rest}", "masks.{m}.{rest}"),
    ("{p}_classifier.classifier.0.{rest}", "heads.{m}.{rest}"),
    ("{p}_encoder.trans{p}.layers.{i}.self_attn.{rest}", "encoders.{m}.transformer.layers.{i}.self_attn.{rest}"),
    ("{p}_encoder.trans{p}.layers.{i}.fc1.{rest}", "encoders.{m}.transformer.layers.{i}.linear1.{rest}"),
    ("{p}_encoder.trans{p}.layers.{i}.fc2.{rest}", "encoders.{m}.transformer.layers.{i}.linear2.{rest}"),
    ("{p}_encoder.trans{p}.layers.{i}.layer_norms.0.{rest}", "encoders.{m}.transformer.layers.{i}.norm1.{rest}"),
    ("{p}_encoder.trans{p}.layers.{i}.layer_norms.1.{rest}", "encoders.{m}.transformer.layers.{i}.norm2.{rest}"),
    ("{p}_encoder.trans{p}.layer_norm.{rest}", "encoders.{m}.transformer.norm.{rest}"),
    ("a_encoder.proj_a.weight", "encoders.audio.proj.weight"),
    ("v_encoder.proj_v.weight", "encoders.vision.proj.weight"),
    ("fusion.classifier.classifier.0.{rest}", "fusion.classifier.{rest}"),
]
_TEXT = {"features": [("l_encoder.proj_l.weight", "encoders.text.proj.weight")],
         "bert": [("l_encoder.proj_l.weight", "encoders.text.proj.proj.weight"),
                  ("l_encoder.bert.embeddings.{rest}", "encoders.text.bert.embeddings.{rest}"),
                  ("l_encoder.bert.encoder.{rest}", "encoders.text.bert.encoder.{rest}"),
                  ("l_encoder.bert.pooler.{rest}", "encoders.text.bert.pooler.{rest}")]}
_FUSION = {"multiplication": [("fusion.linear_mul.{rest}", "fusion.linear.{rest}")],
           "concat": [("fusion.linear.{rest}", "fusion.linear.{rest}")], "add": []}
#: Published keys that the released forward never reads; dropped by :func:`published_to_mim_fast`:
#: fairseq's ``version`` and ``_float_tensor`` buffers, the fusion layer of the other fusion mode, and the
#: Conv1d that the released BertModel defines but does not call.
UNUSED_PUBLISHED = ["{p}_encoder.trans{p}.version", "{p}_encoder.trans{p}.embed_positions._float_tensor",
                    "l_encoder.bert.proj_l.weight", "fusion.linear.{rest} (fusion 'multiplication' or 'add')",
                    "fusion.linear_mul.{rest} (fusion 'concat' or 'add')"]


def _compile(template: str, p: str, m: str) -> re.Pattern:
    text = re.escape(template.replace("{p}", p).replace("{m}", m))
    text = text.replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{rest}"), r"(?P<rest>.+)")
    return re.compile(text + "$")


def _fill(template: str, p: str, m: str, match: re.Match) -> str:
    out = template.replace("{p}", p).replace("{m}", m)
    for name in ("i", "rest"):
        if "{%s}" % name in out:
            out = out.replace("{%s}" % name, match.group(name))
    return out


def _rules(text: str, fusion: str) -> List[Tuple[str, str]]:
    if text not in _TEXT:
        raise ValueError("text must be 'features' or 'bert' (mim_fast's text encoder kind); got %r" % (text,))
    if fusion not in _FUSION:
        raise ValueError("fusion must be 'multiplication', 'concat' or 'add' (the published modes); got %r"
                         % (fusion,))
    return _RULES + _TEXT[text] + _FUSION[fusion]


def _map(keys, rules, source: int) -> Tuple[Dict[str, str], List[str]]:
    """{key: mapped key} for ``keys`` by ``rules`` read from side ``source`` (0 published, 1 mim_fast),
    and the keys no rule maps."""
    mapped, unmapped = {}, []
    compiled = [(_compile(r[source], p, m), r[1 - source], p, m) for r in rules for p, m in MODALITIES]
    for key in keys:
        for pattern, target, p, m in compiled:
            match = pattern.match(key)
            if match:
                mapped[key] = _fill(target, p, m, match)
                break
        else:
            unmapped.append(key)
    return mapped, unmapped


def _describe(keys: List[str]) -> str:
    """The keys, with a 5-component prefix shared by more than 4 of them (a layer, say) collapsed to
    'prefix.* (N keys)'."""
    groups: Dict[str, List[str]] = {}
    for k in keys:
        groups.setdefault(".".join(k.split(".")[:5]), []).append(k)
    parts = []
    for prefix, members in groups.items():
        parts.extend(["%s.* (%d keys)" % (prefix, len(members))] if len(members) > 4 else members)
    return ", ".join(parts)


def _unused(keys, fusion: str) -> List[str]:
    patterns = [_compile(t, p, m) for t in ("{p}_encoder.trans{p}.version",
                                            "{p}_encoder.trans{p}.embed_positions._float_tensor",
                                            "l_encoder.bert.proj_l.weight") for p, m in MODALITIES]
    inactive = {"multiplication": ["fusion.linear."], "concat": ["fusion.linear_mul."],
                "add": ["fusion.linear.", "fusion.linear_mul."]}[fusion]
    return [k for k in keys if any(p.match(k) for p in patterns) or any(k.startswith(s) for s in inactive)]


PUBLISHED_ORDER = ("text", "audio", "vision")  # the released Fusion concatenates [l, a, v] (model.py)


def _order(modalities) -> Tuple[str, ...]:
    order = tuple(modalities)
    if sorted(order) != sorted(PUBLISHED_ORDER):
        raise ValueError("modalities must order text, audio and vision, each once; got %r" % (order,))
    return order


def _concat_blocks(weight: torch.Tensor, src, dst) -> torch.Tensor:
    """A concat fusion's (D, 3D) weight with its column blocks (one D-wide block per modality, in the order
    ``src``) rearranged into the order ``dst``: the same layer for a model that concatenates in that order."""
    if tuple(src) == tuple(dst):
        return weight
    blocks = dict(zip(src, weight.chunk(3, dim=1)))
    return torch.cat([blocks[m] for m in dst], dim=1)


def published_to_mim_fast(state_dict: Dict[str, torch.Tensor], *, fusion: str = "multiplication",
                          text: str = "features", modalities=PUBLISHED_ORDER) -> Dict[str, torch.Tensor]:
    """The authors' whole-model state_dict (``MIM`` of zengy268/MIM: ``l_encoder``, ``a_encoder``,
    ``v_encoder``, ``l_mask``/``a_mask``/``v_mask``, ``l_classifier``..., ``fusion``) with mim_fast.nn.MIM's
    keys (modalities text, audio, vision). Tensors are not copied.

    fusion: the published Fusion's mode ("multiplication", its default; "concat"; "add"): its active layer
    maps to ``fusion.linear``, the other is dropped. text: mim_fast's text encoder — "features"
    (precomputed BERT features: only ``l_encoder.proj_l`` maps) or "bert" (``l_encoder.bert.*`` maps to
    the Hugging Face BERT inside). Keys in :data:`UNUSED_PUBLISHED` are dropped. Raises ValueError listing
    every other key that has no counterpart.
    """
    unused = set(_unused(state_dict, fusion))
    keys = [k for k in state_dict if k not in unused]
    mapped, unmapped = _map(keys, _rules(text, fusion), 0)
    if unmapped:
        hint = " (the BERT weights map with text='bert')" if text == "features" and any(
            k.startswith("l_encoder.bert.") for k in unmapped) else ""
        raise ValueError("cannot map %d key%s of the published state_dict onto mim_fast.nn.MIM%s: %s" % (
            len(unmapped), "" if len(unmapped) == 1 else "s", hint, _describe(unmapped)))
    out = {mapped[k]: state_dict[k] for k in keys}
    if fusion == "concat" and "fusion.linear.weight" in out:
        # The released Fusion concatenates text, audio, vision; mim_fast's concatenates in its modalities'
        # order: the weight's column blocks follow that order, or the layer would read each modality's
        # features with another's weights (silently: the shapes agree).
        out["fusion.linear.weight"] = _concat_blocks(out["fusion.linear.weight"], PUBLISHED_ORDER,
                                                     _order(modalities))
    return out


def mim_fast_to_published(state_dict: Dict[str, torch.Tensor], *, modalities=None) -> Dict[str, torch.Tensor]:
    """mim_fast.nn.MIM's state_dict (modalities text, audio, vision) with the authors' keys, plus the
    fairseq buffers the published encoders hold (``version`` = [2.], ``embed_positions._float_tensor``).
    The published model loads it with ``strict=False``; its only missing keys are then the layers mim_fast
    has no counterpart of (the Fusion's inactive layer, the unused Conv1d in its BertModel). The fusion kind
    is read from ``fusion.linear.weight``'s shape: (D, D) "multiplication", (D, 3D) "concat", none "add"
    ("tensor" fusion has no published counterpart). Raises ValueError listing every key without one."""
    text = "bert" if "encoders.text.proj.proj.weight" in state_dict else "features"
    weight = state_dict.get("fusion.linear.weight")
    fusion = "add" if weight is None else "multiplication" if weight.shape[0] == weight.shape[1] else (
        "concat" if weight.shape[1] == 3 * weight.shape[0] else "tensor")
    if fusion == "tensor":
        raise ValueError("fusion.linear.weight has shape %s: tensor fusion has no published counterpart"
                         % (tuple(weight.shape),))
    mapped, unmapped = _map(list(state_dict), _rules(text, fusion), 1)
    if unmapped:
        raise ValueError("cannot map %d key%s of the mim_fast.nn.MIM state_dict onto the published model: %s" % (
            len(unmapped), "" if len(unmapped) == 1 else "s", _describe(unmapped)))
    out = {mapped[k]: v for k, v in state_dict.items()}
    if fusion == "concat":
        if modalities is None:  # the order the model registered its encoders in, as its state_dict lists them
            modalities = tuple(dict.fromkeys(k.split(".")[1] for k in state_dict if k.startswith("encoders.")))
        out["fusion.linear.weight"] = _concat_blocks(out["fusion.linear.weight"], _order(modalities),
                                                     PUBLISHED_ORDER)
    for p, m in MODALITIES[1:]:
        if any(k.startswith("%s_encoder.trans%s." % (p, p)) for k in out):
            out["%s_encoder.trans%s.version" % (p, p)] = torch.tensor([2.0])
            out["%s_encoder.trans%s.embed_positions._float_tensor" % (p, p)] = torch.zeros(1)
    return out


def load_published_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load the authors' whole-model state_dict into ``model`` (a mim_fast.nn.MIM over text, audio and
    vision), converted by :func:`published_to_mim_fast` with the model's fusion and text encoder. Raises
    ValueError naming every key that cannot be mapped, that the model needs but the state_dict lacks,
    or whose shape differs."""
    specs = {s.name: s for s in getattr(model, "specs", ())}
    if set(specs) != {"text", "audio", "vision"}:
        raise ValueError("the model must be a mim_fast.nn.MIM over text, audio and vision; got modalities %s"
                         % sorted(specs))
    text = "bert" if specs["text"].kind == "bert" else "features"
    if specs["text"].kind == "words":
        raise ValueError("the model's text encoder is a learned word embedding, which the published model does "
                         "not have: build it with text features or a BERT")
    converted = published_to_mim_fast(state_dict, fusion=model.fusion.kind, text=text,
                                      modalities=[s.name for s in model.specs])
    own = model.state_dict()
    # BERT's position_ids (an arange buffer, no information) is persistent in some transformers releases and
    # not in others: the checkpoint's is dropped where this model has none.
    converted = {k: v for k, v in converted.items() if k in own or not k.endswith("embeddings.position_ids")}
    problems = []
    missing = [k for k in own if k not in converted]
    extra = [k for k in converted if k not in own]
    shapes = ["%s %s vs %s" % (k, tuple(converted[k].shape), tuple(own[k].shape)) for k in converted
              if k in own and converted[k].shape != own[k].shape]
    if missing:
        problems.append("the published state_dict lacks %s" % _describe(missing))
    if extra:
        problems.append("the model has no %s" % _describe(extra))
    if shapes:
        problems.append("shapes differ (published vs model): %s" % ", ".join(shapes))
    if problems:
        raise ValueError("the published state_dict does not fit this model: %s" % "; ".join(problems))
    model.load_state_dict(converted, strict=True)
