"""The training form: one widget per training option of the chosen mode.

The options, their types, choices, defaults and help texts come from the core's config
dataclasses (:func:`selfclassifier_core.training.config.option_specs`), the same list ``train``'s
flags are made from, so a new option appears here without touching the app. This module adds
only words (labels), the order of the first row and the app's starting values.
"""
from __future__ import annotations

from typing import Any

import streamlit as st

from selfclassifier_core.training.config import MODES, OptionSpec, option_specs

# the training modes in the order offered, in words (a mode missing here is shown by its name)
MODE_WORDS = {
    "fast": "Fast — frozen pretrained backbone (about a minute)",
    "scratch": "Scratch — learn everything from these images (the paper)",
    "finetune": "Fine-tune — pretrained backbone trained end to end",
}
AUTO = "auto"  # the core picks the backbone from the folder and the device
# offered first, in this order; the core's other backbones follow
COMMON_BACKBONES = ("resnet18", "resnet34", "resnet50", "efficientnet_lite0", "dinov2_s",
                    "dinov2_b", "dinov2_l", "clip_b32", "clip_b16", "clip_l14", "siglip_b16",
                    "efficientnet_b0", "convnext_tiny", "vit_b_16")
# the first rows of the form (three a row), in this order; every other option goes under
# "More settings"
FIRST = ("backbone", "device", "classes", "minutes", "epochs", "batch_size")
# labels in words; an option not named here is labelled from its name
LABELS = {
    "backbone": "Backbone", "device": "Device", "classes": "Classes",
    "minutes": "Time budget (minutes)", "epochs": "Epochs", "batch_size": "Batch size",
    "pretrained": "Pretrained weights", "lr": "Learning rate", "n_local": "Local crops",
    "nn_positives": "Nearest-neighbour positives", "augment": "Augmentation on",
    "image_size": "Image size (px)", "views": "Cached views", "workers": "Loader workers",
}
DEFAULT = "default"  # the words for "the recipe decides"


def mode_choices() -> list[str]:
    """The core's training modes, those described in :data:`MODE_WORDS` first."""
    return [m for m in MODE_WORDS if m in MODES] + [m for m in MODES if m not in MODE_WORDS]


def backbone_choices() -> list[str]:
    """``auto``, then the core's backbones: the common ones first."""
    from selfclassifier_core.engine.backbone_names import NAMES  # no torch

    return ([AUTO] + [b for b in COMMON_BACKBONES if b in NAMES]
            + [b for b in NAMES if b not in COMMON_BACKBONES])


def backbone_weights_note(full: bool = False) -> str:
    """Which backbones have pretrained weights on this machine (no network) and how to get the
    DINOv2 / CLIP / SigLIP ones that do not, in words (under the Backbone list; ``full``: every
    download command, for its help)."""
    from selfclassifier_core.engine import hub_weights  # no torch
    from selfclassifier_core.training.recipes import default_backbone_choice, offline_weights

    here = [n for n in hub_weights.SHORT_NAMES if hub_weights.weights_available(n)]
    missing = [n for n in hub_weights.SHORT_NAMES if n not in here]
    if offline_weights():
        here.append("efficientnet_lite0")
    name, reason = default_backbone_choice()
    lines = [f"Automatic (fast mode): **{name}**, {reason}.",
             "Weights on this machine: " + (", ".join(f"✓ {n}" for n in here) or "none") + "."]
    if missing:
        how = ("; ".join(f"`{hub_weights.download_command(n)}` ({n})" for n in missing)
               if full else "`hf download REPO FILE` (each one's command: this list's help)")
        lines.append(f"Not here: {', '.join(missing)}. They download from the Hugging Face hub "
                     f"on first use when online; offline, get them once with {how}, or give a "
                     "weights file under Pretrained weights.")
    return "  \n".join(lines)


def default_mode(n_images: int) -> str:
    """The default grouping's mode (:func:`~selfclassifier_core.training.recipes.default_run_options`)."""
    from selfclassifier_core.training.recipes import default_run_options

    return default_run_options(n_images)["mode"]


def default_settings(n_images: int, mode: str) -> dict[str, Any]:
    """The form's starting values for ``mode``: the default grouping's options when it is that
    mode. Anything not set here starts at the config's default, which leaves it to the core's
    recipe (views, image size, steps sized to the folder and the device), so the app and the
    command line train the same way."""
    from selfclassifier_core.training.recipes import (default_minutes, default_run_options,
                                                      offline_weights)

    start = default_run_options(n_images)
    if start["mode"] == mode:
        return {k: v for k, v in start.items() if k != "mode"}
    if mode == "fast":
        return {}
    weights = ({"backbone": "efficientnet_lite0", "pretrained": "imagenet"}
               if mode == "finetune" and offline_weights() else {})
    return {**weights, "minutes": default_minutes(n_images)}


def label(spec: OptionSpec) -> str:
    return LABELS.get(spec.name) or spec.name.replace("_", " ").capitalize()


def _help(spec: OptionSpec) -> str:
    return f"{spec.help[0].upper()}{spec.help[1:]}. Command line: `{spec.flag}`."


def widget(spec: OptionSpec, value: Any, where=st) -> Any:
    """The input for one option (key ``opt_<name>``); empty or "default" returns None, which
    leaves the value to the core's recipe."""
    key, text, help_ = f"opt_{spec.name}", label(spec), _help(spec)
    if spec.name == "backbone":
        choices = backbone_choices()
        chosen = where.selectbox(text, choices, index=choices.index(value or AUTO), key=key,
                                 help=f"{help_}\n\n{backbone_weights_note(full=True)}",
                                 format_func=lambda b: "automatic" if b == AUTO else b)
        where.caption(backbone_weights_note())
        return chosen
    if spec.choices:
        choices = ([] if spec.default in spec.choices else [None]) + list(spec.choices)
        return where.selectbox(text, choices, index=choices.index(value), key=key, help=help_,
                               format_func=lambda c: DEFAULT if c is None else c)
    if spec.kind == "bool":
        if spec.default is not None:
            return where.checkbox(text, value=bool(value), key=key, help=help_)
        choices = [None, True, False]
        return where.selectbox(text, choices, index=choices.index(value), key=key, help=help_,
                               format_func=lambda c: {None: DEFAULT, True: "on", False: "off"}[c])
    if spec.kind in ("int", "float"):
        integer = spec.kind == "int"
        return where.number_input(
            text, value=None if value is None else (int(value) if integer else float(value)),
            step=1 if integer else 0.5, format=None if integer else "%g", key=key, help=help_,
            placeholder="automatic" if spec.default is None else None)
    return where.text_input(text, value=value or "", key=key, help=help_,
                            placeholder=DEFAULT).strip() or None


def _reset_options() -> None:
    """A new mode starts from its own starting values, not the previous mode's inputs."""
    for key in [k for k in st.session_state if str(k).startswith("opt_") and k != "opt_mode"]:
        del st.session_state[key]


def settings_form(n_images: int, disabled: bool) -> dict[str, Any] | None:
    """The mode picker and the form of its options; the options to train with once "Start
    training" is pressed (None before), with ``mode`` and without empty values."""
    modes = mode_choices()
    mode = st.selectbox("Mode", modes, index=modes.index(default_mode(n_images)), key="opt_mode",
                        format_func=lambda m: MODE_WORDS.get(m, m), on_change=_reset_options)
    start = default_settings(n_images, mode)
    specs = {s.name: s for s in option_specs(mode)}
    values: dict[str, Any] = {}
    with st.form("train_settings"):
        first = [n for n in FIRST if n in specs]
        for i, name in enumerate(first):
            if i % 3 == 0:
                row = st.columns(3)
            values[name] = widget(specs[name], start.get(name, specs[name].default), row[i % 3])
        rest = [s for n, s in specs.items() if n not in FIRST and n != "mode"]
        with st.expander("More settings"):
            st.caption("Empty or “default”: the core's recipe for this folder and device.")
            columns = st.columns(3)
            for i, spec in enumerate(rest):
                values[spec.name] = widget(spec, start.get(spec.name, spec.default),
                                           columns[i % 3])
        pressed = st.form_submit_button("Start training", type="primary", disabled=disabled)
    if not pressed:
        return None
    options = {k: v for k, v in values.items() if v is not None and v != specs[k].default}
    if options.get("backbone") == AUTO:
        del options["backbone"]
    if (mode in ("fast", "finetune") and not options.get("pretrained")
            and values.get("backbone") == "efficientnet_lite0"):
        options["pretrained"] = "imagenet"  # the offline weights this backbone ships with
    return {"mode": mode, **options}
