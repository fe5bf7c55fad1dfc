"""The names the config is checked against: the pre-training sets (methods) the evaluation
compares, its downstream protocols, and the choices of the training library's options.

A method name is one of:

- ``no_pretrain``: no pre-training set, the student stays at its seeded initialisation;
- ``random`` / ``sas`` / ``high_loss`` (:data:`INIT_METHODS`): the real subsets of the init stage,
  pre-trained at ``evaluate.lr``;
- ``full``: all of D_real, at ``evaluate.lr``;
- ``random@alpha`` / ``high_loss@alpha`` (:data:`LR_MATCHED`): the lr-matched controls, those real
  subsets pre-trained at MKDT's learned alpha_syn;
- ``mkdt``: the distilled set, at its learned alpha_syn;
- ``mkdt_<subset>`` (:data:`VARIANTS`): MKDT distilled from another init subset
  (``distill.variants``), at its own learned alpha_syn;
- ``mtt_ssl``: the MTT-SSL set of ``mkdt analyze mtt``, at its own lr;
- ``krr_st``: the KRR-ST set of the ``krr_st`` stage (the paper's other self-supervised
  distillation, from the same teacher, targets and init subsets), at ``evaluate.lr`` (KRR-ST learns
  no step size);
- ``ext:NAME``: the set ``mkdt import NAME SOURCE`` wrote to ``RUN/imported/NAME.safetensors``, at
  its own lr (``evaluate.lr``, or the learned one of a set imported from another mkdt run).

:func:`parse_method` is the only code that reads a name's parts; everything else asks the
:class:`Method` it returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mkdt.errors import ConfigError

INIT_METHODS = ("high_loss", "random", "sas")
"""The subsets the init stage stores (their tensor names in ``init/indices.safetensors``)."""
AT_ALPHA = "@alpha"
"""Suffix of the lr-matched controls: ``<subset>@alpha``."""
VARIANT_PREFIX = "mkdt_"
"""Prefix of MKDT distilled from another init subset: ``mkdt_<subset>``."""
EXTERNAL_PREFIX = "ext:"
"""Prefix of the methods of imported sets: ``ext:NAME``."""
EXTERNAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""What NAME may be: letters, digits, ``_``, ``.`` and ``-``, starting with a letter or a digit."""

METHOD_NAMES = {
    "no_pretrain": "no pre-training",
    "random": "random subset",
    "sas": "SAS subset",
    "high_loss": "high-loss subset",
    "random@alpha": "random subset @ MKDT's lr",
    "high_loss@alpha": "high-loss subset @ MKDT's lr",
    "krr_st": "KRR-ST",
    "mkdt_high_loss": "MKDT (high-loss init)",
    "mkdt_random": "MKDT (random init)",
    "mkdt_sas": "MKDT (SAS init)",
    "mkdt": "MKDT",
    "mtt_ssl": "MTT-SSL",
    "full": "full data",
}
"""The label of every method but ``ext:NAME``, in the order of the results tables."""
EVAL_METHODS = ("no_pretrain", "random", "sas", "high_loss", "full", "mkdt")
"""What the evaluate stage runs by default."""
LR_MATCHED = ("random@alpha", "high_loss@alpha")
"""The lr-matched controls: ``<subset>@alpha`` is that init subset pre-trained at MKDT's learned
alpha_syn."""
VARIANTS = ("mkdt_high_loss", "mkdt_random", "mkdt_sas")
"""MKDT distilled from another init subset by the same distill stage (``distill.variants``):
``mkdt_<subset>``, pre-trained at its own learned alpha_syn (the paper's "MKDT (Rnd Sub)" is
``mkdt_random``)."""
OPTIONAL_METHODS = (*LR_MATCHED, "mtt_ssl", "krr_st", *VARIANTS)
"""Accepted by ``evaluate.methods`` but not run by default. The lr-matched controls matter under
``evaluate.selection=fixed``, where MKDT pre-trains at its learned step size and the real sets at
``evaluate.lr``; under ``tuned`` every set tries the same step sizes, so ``<subset>@alpha`` gives
the same results as ``<subset>``."""
METHOD_CHOICES = (
    f"{', '.join(EVAL_METHODS + OPTIONAL_METHODS)}, or {EXTERNAL_PREFIX}NAME (an imported set; NAME of "
    "letters, digits, _ . -)"
)
"""The accepted names, as error messages list them."""

SAME_SIZE_KINDS = ("subset", "mtt_ssl", "krr_st", "external")
"""The kinds of :class:`Method` whose sets are the distilled set's size (or chosen to be compared
at it): what "the best same-size set" of :func:`mkdt.results.headlines` is chosen among. A set
imported from another mkdt run is ``external`` by name but its records say ``distilled``
(:func:`mkdt.results.set_kind`): an MKDT variant, not a baseline."""

PROTOCOLS = ("probe", "finetune")
"""The downstream protocols, in the order of records and tables: ``probe`` (a linear probe on the
frozen features) and ``finetune`` (the whole encoder and a new linear head trained on the labels)."""
PROTOCOL_TITLES = {
    "probe": "Linear probe",
    "finetune": "Fine-tuning (the whole encoder and a linear head)",
}

BACKENDS = ("auto", "unrolled", "recompute")
"""How trajectory matching computes its gradient (``distill.backend``, :mod:`mkdt.train.matching`)."""
SAS_PROXIES = ("expert", "teacher")
"""The proxy encoders of the SAS subset (``init.sas_proxy``, :mod:`mkdt.train.sas`)."""

Kind = Literal["none", "subset", "full", "distilled", "mtt_ssl", "krr_st", "external"]
StepSize = Literal["eval_lr", "alpha", "own"]
Source = Literal["init", "distill", "variant", "mtt", "krr_st", "imported", "data"]


@dataclass(frozen=True)
class Method:
    """A method name as typed fields.

    - ``kind``: what the set is: ``none`` (no pre-training), a real ``subset``, the ``full`` data,
      a ``distilled`` MKDT set, the ``mtt_ssl`` set, the ``krr_st`` set or an ``external``
      (imported) one;
    - ``subset``: the init subset of a real subset, an lr-matched control or a variant; else None;
    - ``step_size``: the pre-training lr: ``eval_lr`` (``evaluate.lr``), ``alpha`` (MKDT's learned
      alpha_syn) or ``own`` (the set's own stored lr); None without pre-training;
    - ``source``: the artifact its images come from: ``init`` (the init stage's indices into
      D_real), ``distill`` (the distilled set), ``variant`` (``distill/variants/<subset>/``),
      ``mtt`` (``mkdt analyze mtt``), ``krr_st`` (the krr_st stage), ``imported`` (``mkdt
      import``), ``data`` (D_real); None without pre-training;
    - ``external``: NAME of ``ext:NAME``; else None;
    - ``label``: the human name of tables and figures.
    """

    name: str
    kind: Kind
    label: str
    subset: str | None = None
    step_size: StepSize | None = None
    source: Source | None = None
    external: str | None = None

    @property
    def distilled_step(self) -> bool:
        """Whether it pre-trains at an alpha_syn the distill stage learned (set by ``distill.lr_lr``)."""
        return self.step_size == "alpha" or self.source == "variant"


def variant_method(subset: str) -> str:
    """The method of MKDT distilled from init subset ``subset`` ("random" -> "mkdt_random")."""
    return VARIANT_PREFIX + subset


def external_method(name: str) -> str:
    """The method of the imported set ``name`` ("krr" -> "ext:krr")."""
    return EXTERNAL_PREFIX + name


def _named_methods() -> dict[str, Method]:
    """The :class:`Method` of every name of :data:`METHOD_NAMES`."""
    label = METHOD_NAMES
    methods = [
        Method("no_pretrain", "none", label["no_pretrain"]),
        *(Method(s, "subset", label[s], subset=s, step_size="eval_lr", source="init") for s in INIT_METHODS),
        Method("full", "full", label["full"], step_size="eval_lr", source="data"),
        *(
            Method(m, "subset", label[m], subset=m.removesuffix(AT_ALPHA), step_size="alpha", source="init")
            for m in LR_MATCHED
        ),
        Method("mkdt", "distilled", label["mkdt"], step_size="alpha", source="distill"),
        *(
            Method(
                variant_method(s),
                "distilled",
                label[variant_method(s)],
                subset=s,
                step_size="own",
                source="variant",
            )
            for s in INIT_METHODS
        ),
        Method("mtt_ssl", "mtt_ssl", label["mtt_ssl"], step_size="own", source="mtt"),
        Method("krr_st", "krr_st", label["krr_st"], step_size="eval_lr", source="krr_st"),
    ]
    return {m.name: m for m in methods}


_NAMED = _named_methods()


def parse_method(name: str) -> Method:
    """The :class:`Method` of ``name``; ConfigError naming the accepted names when it is none."""
    if name in _NAMED:
        return _NAMED[name]
    external = name.removeprefix(EXTERNAL_PREFIX)
    if name.startswith(EXTERNAL_PREFIX) and EXTERNAL_NAME.fullmatch(external):
        return Method(
            name, "external", f"{external} (imported)", step_size="own", source="imported", external=external
        )
    raise ConfigError(f"unknown method {name!r}: choose from {METHOD_CHOICES}")


def is_method(name: str) -> bool:
    """Whether :func:`parse_method` accepts ``name``."""
    try:
        parse_method(name)
    except ConfigError:
        return False
    return True


def method_label(name: str) -> str:
    """The human name of a method ("mkdt" -> "MKDT", "ext:krr" -> "krr (imported)"); unknown names
    are returned as they are."""
    return parse_method(name).label if is_method(name) else name


def method_order(name: str) -> tuple[int, str]:
    """Sort key of methods: the order of :data:`METHOD_NAMES`, other methods (``ext:NAME``, unknown
    names) last by name."""
    order = list(METHOD_NAMES)
    return (order.index(name), "") if name in order else (len(order), name)
