"""One config dataclass per training mode, each validated in one place.

- :class:`TrainConfig`: ``scratch`` (the paper, everything from random weights) and
  ``finetune`` (end to end from pretrained backbone weights, the backbone at a lower rate).
- :class:`FastConfig`: ``fast`` (Self-Classifier heads on a frozen backbone's cached features).

A field left ``None`` means "the recipe decides" (:mod:`.recipes` fills it from the folder and
the device). ``validate()`` checks what needs no folder, so a typo fails before a scan;
the recipes add the checks that need the folder (more classes than images, ...). Both raise
``ValueError`` naming the option as the command line spells it.

The command line, the app's background jobs and the checkpoint all go through these classes:
``train``'s flags, the app's training form and the job's command line are made from the fields
that carry a ``help`` (:func:`option_specs`); the checkpoint stores ``config.to_dict()`` and
prediction reads it back with :func:`config_from_dict`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from ..engine.device import DEVICES

MODES = ("scratch", "fast", "finetune")
RESUMABLE_MODES = ("scratch", "finetune")  # fast runs start again from their feature cache
OPTIMIZERS = ("lars", "adamw")
AUGMENTS = ("auto", "cpu", "device")
DEFAULT_ROW_TAU = 0.1

# spellings of earlier versions, read from old checkpoints and config files
_RENAMED = {"warmup_frac": "warmup_fraction"}


def _opt(help: str, *, choices: tuple[str, ...] | None = None, flag: bool = True) -> dict:
    """Field metadata: the help text of the option (and its choices), shown by the CLI."""
    return {"help": help, "choices": choices, "flag": flag}


def flag_name(name: str) -> str:
    """The command-line spelling of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _positive_int(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{flag_name(name)} must be a positive integer, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{flag_name(name)} must be > 0, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"{flag_name(name)} must be one of {', '.join(choices)}, got {value!r}")


PREDICT_NEIGHBOURS = 10  # a refit's probabilities: mean over the image and this many nearest
                         # neighbours (benchmarks/refit.py, fast, 50 checks, queue / random:
                         # MNIST 0.813 / 0.788 -> 0.831 / 0.815, digits 0.852 / 0.848 ->
                         # 0.858 / 0.853, emoji 0.654 / 0.612 -> 0.665 / 0.636; 20
                         # neighbours: MNIST random 0.799, digits 0.846 / 0.844; 200
                         # checks: queue and random within 0.005 with or without; 0: off);
                         # scratch and finetune refits average as many in their own embedding
                         # (inference.predict; 50 checks, queue: MNIST 0.758 -> 0.790,
                         # digits 0.917 -> 0.921, emoji 0.512 -> 0.514)


@dataclass
class _Common:
    """Options every mode has."""

    mode: ClassVar[str]

    classes: int | None = field(default=None, metadata=_opt(
        "classes of the main head (≥ 2); finer heads 2K and 4K are added when they fit"))
    heads: list[int] | None = None
    backbone: str | None = field(default=None, metadata=_opt(
        "resnet18, resnet34, resnet50, vit_b_16, convnext_tiny, efficientnet_b0, "
        "efficientnet_lite0, dinov2_s/b/l, clip_b32/b16/l14, siglip_b16, timm:MODEL, "
        "open_clip:ARCH:TAG, ..."))
    pretrained: str | None = field(default=None, metadata=_opt(
        "weights name (DEFAULT: the backbone's pretrained weights; DINOv2/CLIP/SigLIP from "
        "the Hugging Face cache) or a local weights file"))
    epochs: int | None = field(default=None, metadata=_opt("number of epochs"))
    minutes: float | None = field(default=None, metadata=_opt(
        "time budget; stops cleanly, then predicts"))
    batch_size: int | None = field(default=None, metadata=_opt("global batch (≥ classes)"))
    device: str = field(default="auto", metadata=_opt(
        "auto: CUDA, then Apple MPS, then CPU", choices=DEVICES))
    optimizer: str | None = field(default=None, metadata=_opt(
        "optimizer (default: the mode's recipe)", choices=OPTIMIZERS))
    lr: float | None = field(default=None, metadata=_opt(
        "peak learning rate (default scales with the batch)"))
    weight_decay: float | None = None
    warmup_fraction: float = 0.05
    row_tau: float = DEFAULT_ROW_TAU
    col_tau: float = 0.05
    proj_hidden_dim: int | None = None
    seed: int = field(default=0, metadata=_opt(
        "seeds initialisation, sampling and augmentation"))
    workers: int | None = field(default=None, metadata=_opt(
        "data loader processes (default: engine.device.default_workers)"))
    # a refit (workflows.refit): the run it starts from, and the weight of the supervised term
    # toward the classes of the run directory's targets.npz (training.targets)
    refit_of: int | None = None
    supervised_weight: float = 1.0

    @property
    def prediction_neighbours(self) -> int:
        """How many nearest images' class probabilities each image's prediction is averaged
        with (:data:`PREDICT_NEIGHBOURS` for a refit, in every mode; 0: the model's own)."""
        return PREDICT_NEIGHBOURS if self.refit_of is not None else 0

    # ---------------------------------------------------------------- validation
    def validate(self) -> "_Common":
        """Check every value that needs no folder; raises ``ValueError`` naming the option."""
        if self.classes is not None and (not isinstance(self.classes, int)
                                         or isinstance(self.classes, bool) or self.classes < 2):
            raise ValueError(f"--classes must be an integer ≥ 2, got {self.classes!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int)
                                            or self.batch_size < 2):
            raise ValueError(f"--batch-size must be an integer ≥ 2, got {self.batch_size!r}")
        if self.classes is not None and self.batch_size is not None \
                and self.batch_size < self.classes:
            raise ValueError(f"--batch-size {self.batch_size} is smaller than --classes "
                             f"{self.classes}; the uniform class prior needs batch ≥ classes "
                             f"(use --batch-size {self.classes} or more, or fewer classes)")
        if self.heads is not None:
            if not self.heads or any(not isinstance(k, int) or k < 2 for k in self.heads):
                raise ValueError(f"heads must be class counts ≥ 2, got {self.heads!r}")
        _positive_int("epochs", self.epochs)
        _positive("minutes", self.minutes)
        _positive("lr", self.lr)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        dev = str(self.device)
        if dev not in DEVICES and not dev.startswith("cuda:"):
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction!r}")
        if not (self.row_tau > 0 and self.col_tau > 0):
            raise ValueError(f"row_tau and col_tau must be > 0, got {self.row_tau}, {self.col_tau}")
        _positive_int("proj_hidden_dim", self.proj_hidden_dim)
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ValueError(f"--workers must be an integer ≥ 0, got {self.workers!r}")
        if not (isinstance(self.supervised_weight, (int, float)) and self.supervised_weight >= 0):
            raise ValueError(f"supervised_weight must be ≥ 0, got {self.supervised_weight!r}")
        return self

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, **dataclasses.asdict(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: dict[str, Any]):
        """A config from keyword options (None values mean "the recipe decides"); unknown
        names are an error that lists the valid ones. Validated."""
        known = set(cls.field_names())
        options = {_RENAMED.get(k, k): v for k, v in options.items()
                   if k != "mode" or "mode" in known}
        unknown = sorted(k for k, v in options.items() if k not in known and v is not None)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(known)}")
        return cls(**{k: v for k, v in options.items() if v is not None}).validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Read back what :meth:`to_dict` wrote (old spellings accepted; unknown keys, such
        as the resolved extras of old fast-mode files, ignored)."""
        data = {_RENAMED.get(k, k): v for k, v in data.items()}
        known = set(cls.field_names())
        values = {k: v for k, v in data.items() if k in known}
        for name in ("global_scale", "local_scale"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)


@dataclass
class TrainConfig(_Common):
    """Options of a ``scratch`` or ``finetune`` run (saved in the checkpoint and config.json)."""

    mode: str = field(default="scratch", metadata=_opt(
        "default: fast with --pretrained, else scratch", choices=MODES))  # type: ignore[assignment]
    momentum: float = 0.9
    final_lr_fraction: float = 0.01
    clip_grad: float = 3.0
    global_size: int | None = None
    local_size: int | None = None
    n_local: int | None = field(default=None, metadata=_opt("local crops per image"))
    global_scale: tuple[float, float] | None = None
    local_scale: tuple[float, float] | None = None
    small_input: bool = False
    nn_positives: bool | None = field(default=None, metadata=_opt(
        "use a nearest neighbour's image as the positive of view 1 (paper v2)"))
    queue_size: int = 65536
    backbone_lr_scale: float | None = None
    augment: str | None = field(default=None, metadata=_opt(
        "where the multi-crop views are made: cpu (PIL in the loader workers), device "
        "(batched on the training device), auto (default: device on CUDA, else cpu)",
        choices=AUGMENTS))

    def validate(self) -> "TrainConfig":
        super().validate()
        _choice("mode", self.mode, RESUMABLE_MODES)
        if self.mode == "finetune" and not self.pretrained:
            raise ValueError("mode 'finetune' needs --pretrained NAME|PATH")
        _choice("augment", self.augment, AUGMENTS)
        for name in ("global_size", "local_size"):
            _positive_int(name, getattr(self, name))
        if self.n_local is not None and (not isinstance(self.n_local, int) or self.n_local < 0):
            raise ValueError(f"--n-local must be an integer ≥ 0, got {self.n_local!r}")
        if self.global_scale is not None or self.local_scale is not None:
            from ..engine.transforms import crop_scale

            for name in ("global_scale", "local_scale"):
                if getattr(self, name) is not None:
                    setattr(self, name, crop_scale(name, getattr(self, name)))
        return self

    @property
    def eval_size(self) -> int:
        """Side of the images prediction sees."""
        return int(self.global_size or 224)


@dataclass
class FastConfig(_Common):
    """Options of a ``fast`` run.

    ``steps`` (or ``epochs`` of ``ceil(N / batch_size)`` steps) bounds the training; ``minutes``
    bounds the whole run (feature extraction included) and stops training early when reached.
    """

    mode: ClassVar[str] = "fast"

    pretrained: str | None = field(default="DEFAULT", metadata=_opt(
        "weights name (DEFAULT: the backbone's pretrained weights; DINOv2/CLIP/SigLIP from "
        "the Hugging Face cache) or a local weights file"))
    views: int | None = field(default=None, metadata=_opt(
        "cached views per image (default: the recipe for the device)"))
    image_size: int | None = field(default=None, metadata=_opt(
        "side of each cached view in px (default: the recipe)"))
    steps: int | None = field(default=None, metadata=_opt("training steps"))
    n_train_views: int = 2
    nn_k: int = 20                       # 0 disables nearest-neighbour positives
    nn_prob: float = 0.8
    proj_layers: int = 2
    proj_bn: bool = True
    feature_seed: int = 0                # the cached views' crops (part of the cache key)
    feature_batch_size: int | None = None
    # resolved by the recipe and recorded, so the checkpoint says what was run
    feature_cache: str | None = None
    n_images: int | None = None

    def validate(self) -> "FastConfig":
        super().validate()
        for name in ("views", "steps", "feature_batch_size", "image_size"):
            _positive_int(name, getattr(self, name))
        if self.n_train_views < 2:
            raise ValueError(f"n_train_views must be >= 2, got {self.n_train_views!r}")
        if not 0 <= self.nn_prob <= 1:
            raise ValueError(f"nn_prob must lie in [0, 1], got {self.nn_prob!r}")
        if self.nn_k < 0:
            raise ValueError(f"nn_k must be >= 0, got {self.nn_k!r}")
        return self

    @property
    def eval_size(self) -> int:
        return int(self.image_size or 224)


AnyConfig = Union[TrainConfig, FastConfig]


def run_mode(mode: str | None, options: dict[str, Any]) -> str:
    """The mode of a new run: ``mode`` when given, else ``fast`` with ``pretrained`` weights,
    else ``scratch``."""
    return mode or ("fast" if options.get("pretrained") else "scratch")


def config_class(mode: str) -> type[TrainConfig] | type[FastConfig]:
    _choice("mode", mode, MODES)
    return FastConfig if mode == "fast" else TrainConfig


def make_config(mode: str, options: dict[str, Any]) -> AnyConfig:
    """The validated config of a new run of ``mode`` from keyword options."""
    return config_class(mode).from_options({**options, "mode": mode})


def config_from_dict(data: dict[str, Any]) -> AnyConfig:
    """The config a checkpoint or ``config.json`` holds, through its mode's class."""
    mode = data.get("mode") or "scratch"
    if mode == "fast":
        data = dict(data)
        if data.get("image_size") is None and data.get("global_size"):  # before FastConfig
            data["image_size"] = data["global_size"]
        return FastConfig.from_dict(data)
    return TrainConfig.from_dict(data)


@dataclass(frozen=True)
class OptionSpec:
    """One training option as the command line and the app offer it (a config field that
    carries a help text)."""

    name: str
    kind: str                           # "int", "float", "bool" or "str"
    help: str
    choices: tuple[str, ...] | None
    modes: tuple[str, ...]              # the modes whose config has it
    default: Any                        # the field's default (None: the recipe decides)

    @property
    def flag(self) -> str:
        return flag_name(self.name)


_KINDS = ("bool", "int", "float", "str")


def _kind(name: str, annotation: Any) -> str:
    """``int | None`` -> ``int``; an option of another type is a programming error."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    parts = {p.strip() for p in str(text).split("|")} - {"None"}
    if len(parts) == 1 and next(iter(parts)) in _KINDS:
        return next(iter(parts))
    raise TypeError(f"option {name!r} has type {text!r}; options are bool, int, float or str")


def option_specs(mode: str | None = None) -> list[OptionSpec]:
    """The options of ``mode`` (default: of every mode, each once, listing the modes that have
    it), in the order of the fields. ``train``'s flags, the app's form and the background job's
    command line are made from these."""
    out: dict[str, OptionSpec] = {}
    classes = ((TrainConfig, ("scratch", "finetune")), (FastConfig, ("fast",)))
    for cls, modes in classes:
        if mode is not None:
            if mode not in modes:
                continue
            modes = (mode,)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("flag"):
                continue
            if f.name in out:
                out[f.name] = dataclasses.replace(out[f.name], modes=out[f.name].modes + modes)
                continue
            default = None if f.default is dataclasses.MISSING else f.default
            out[f.name] = OptionSpec(f.name, _kind(f.name, f.type), f.metadata["help"],
                                     f.metadata.get("choices"), modes, default)
    if mode is not None and not out:
        _choice("mode", mode, MODES)
    return list(out.values())
