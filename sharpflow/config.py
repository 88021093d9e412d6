"""The run-level configuration: pydantic models that are the single source of truth for every option
of one run and of the stages that take one run.

- :class:`DatasetConfig` (what ``prepare`` makes), :class:`ModelConfig`, :class:`OptimizerConfig`
  (with :class:`NSGDConfig` and :class:`ScheduleConfig`), :class:`CheckpointConfig`,
  :class:`EvalConfig`, together a :class:`RunConfig`;
- :class:`SpectrumConfig`, the top-k eigenpairs every analysed checkpoint gets;
- :class:`StageResources`, what one stage's job asks the scheduler for;
- run naming (:func:`run_id`, :func:`study_of`) and the step arithmetic (:func:`steps_per_epoch`,
  :func:`checkpoint_steps`), pure functions of a run's config.

The whole config file (studies, per-analysis sections, figures, tables, claims) is assembled in
:mod:`sharpflow.study`, above the registries; this module sits below everything that takes a run,
imports no other layer of the package and no torch, so the Snakefile can load it quickly.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from . import usersources
from .configbase import Name, Strict

#: Bumped when a stage's results change meaning; part of that stage's Snakemake params, so a
#: refactor reruns nothing while a change of meaning reruns exactly that stage and what follows.
#: The analyses' versions join these in :data:`sharpflow.study.FORMAT_VERSION`.
FORMAT_VERSION = {"prepare": 1, "train": 2, "spectrum": 2}

#: The optimizers with a diagonal preconditioner (Adam's sqrt(v̂) + ε): their stability threshold is
#: on the preconditioned Hessian, not 2/η.
ADAPTIVE_OPTIMIZERS = ("adam", "adamw")

#: The best-validation checkpoint's file name (``checkpoints.best``), beside the scheduled ones.
BEST_NAME = "best.pt"

#: Names of the built-in models (sharpflow.models.REGISTRY; a test keeps the two equal).
MODEL_NAMES = ("mlp", "cnn1d", "simplecnn", "simplecnn_medium", "resnet32", "vgg11_bn", "lstm_lm", "gpt")

RUN_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,200}$")


# ----------------------------------------------------------------------------------------- data
class DatasetConfig(Strict):
    """One dataset, prepared once into ``results/data/{name}/``."""

    omit_at_default = ("synthetic_classes", "synthetic_train", "synthetic_test", "path", "function",
                       "num_classes", "train_examples", "tokenizer", "valid_fraction", "test_fraction")

    source: Literal[
        "mnist1d", "cifar10", "cifar100", "mnist", "fashion_mnist", "ptb", "synthetic_images", "synthetic_text",
        "arrays", "text", "python",
    ] = Field(
        description="mnist1d (generated locally), cifar10/cifar100/mnist/fashion_mnist (torchvision), ptb; "
        "synthetic_images / synthetic_text: offline stand-ins shaped like CIFAR / PTB (a Markov-chain token "
        "stream), generated from the seed; your own data: arrays (a .npz), text (a file or directory), "
        "python (a function returning arrays)."
    )
    seed: NonNegativeInt = Field(0, lt=2**32, description="Seed of the train/valid split and of the Hessian subset.")
    hessian_subset: PositiveInt = Field(
        2560, description="N, the fixed training examples over which Hessians are averaged."
    )
    valid_size: NonNegativeInt | None = Field(
        None, description="Validation examples split off the training set (None: the source's default; "
        "arrays, python: 10 %, or an arrays file's own x_valid; 0: a source's own validation set)."
    )
    max_train: PositiveInt | None = Field(None, description="Keep only the first n training examples.")
    cache_dir: str | None = Field(
        None, description="Download cache (default: $SHARPFLOW_DATA or ~/.cache/sharpflow)."
    )
    download: bool = Field(True, description="Allow downloads (torchvision datasets, PTB from a URL).")
    # MNIST-1D
    mnist1d_samples: PositiveInt = Field(5000, description="MNIST-1D: examples generated (80 % train).")
    # PTB
    ptb_location: str | None = Field(
        None, description="PTB: directory or URL prefix holding ptb.{train,valid,test}.txt."
    )
    ptb_sha256: dict[Literal["train", "valid", "test"], str] | None = Field(
        None, description="PTB: expected SHA-256 of each split file (verified when given)."
    )
    ptb_train_tokens: PositiveInt = Field(
        929589,
        description="PTB: tokens in ptb.train.txt incl. <eos> (the standard file has 929,589); synthetic_text: "
        "training tokens generated (valid and test get a twelfth each, about PTB's proportions).",
    )
    bptt: PositiveInt = Field(20, description="PTB: unrolled steps; one example is bptt+1 tokens.")
    vocab_size: PositiveInt = Field(10000, description="PTB and synthetic_text: vocabulary size.")
    # Stand-ins
    synthetic_classes: int = Field(10, ge=2, le=1000, description="synthetic_images: classes (CIFAR: 10 or 100).")
    synthetic_train: PositiveInt = Field(
        50000, description="synthetic_images: training images before the validation split (CIFAR: 50,000)."
    )
    synthetic_test: PositiveInt = Field(10000, description="synthetic_images: test images (CIFAR: 10,000).")
    # Your own data
    path: str | None = Field(None, description="arrays: a .npz with x_train, y_train, x_test, y_test (optionally "
                             "x_valid, y_valid); text: a UTF-8 file or a directory of *.txt files.")
    function: str | None = Field(None, description="python: 'package.module:function' returning the arrays "
                                 "source's keys.")
    num_classes: PositiveInt | None = Field(None, description="arrays, python: classes or vocabulary size "
                                            "(None: the largest label + 1).")
    train_examples: PositiveInt | None = Field(None, description="arrays, text, python: training examples the "
                                               "source gives before the validation split (None: read from the "
                                               "data; required for python).")
    tokenizer: Literal["word", "char"] = Field("word", description="text: words (whitespace, <eos> per line) "
                                               "or characters.")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="text: the share of tokens after train for valid.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="text: the last share of tokens, for test.")

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        if self.source == "ptb" and self.ptb_location is None:
            raise ValueError("ptb_location is required for source 'ptb' (a directory or URL prefix)")
        if self.source == "synthetic_text" and self.vocab_size < 3:
            raise ValueError("synthetic_text needs vocab_size >= 3 (words plus <eos>)")
        if self.source in ("arrays", "text") and not self.path:
            what = ".npz file" if self.source == "arrays" else "text file or directory"
            raise ValueError(f"source {self.source} needs path (the {what})")
        if self.source == "python" and not (self.function and re.fullmatch(r"[\w.]+:\w+", self.function)):
            raise ValueError("source python needs function: 'package.module:function'")
        if self.source == "text" and self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid_fraction + test_fraction must leave tokens for training")
        return self

    def default_valid_size(self) -> int:
        """Validation examples split off the training set: ``valid_size``, else the source's default."""
        if self.valid_size is not None:
            return self.valid_size
        if self.source == "arrays" and usersources.npz_sizes(str(self.path))[1]:
            return 0  # the file's own x_valid, y_valid
        if self.source in ("arrays", "python"):  # 10 % of the source's training examples
            return self._source_train() // 10
        return {"mnist1d": 400, "cifar10": 5000, "cifar100": 5000, "mnist": 10000, "fashion_mnist": 10000,
                "ptb": 0, "synthetic_images": 5000, "synthetic_text": 0, "text": 0}[self.source]

    def _source_train(self) -> int:
        """A user source's training examples before the validation split (read from its data)."""
        return usersources.train_examples(self.source, self.path, self.function, self.tokenizer, self.bptt,
                                          self.valid_fraction, self.test_fraction, self.train_examples)

    def train_size(self) -> int:
        """Training examples after the split, known before anything is prepared.

        The Snakefile needs it to lay out every checkpoint step up front; ``prepare`` checks
        that the real data has exactly this many and fails, naming both numbers, if not.
        """
        full = {
            "mnist1d": int(10 * (self.mnist1d_samples // 10) * 0.8),  # the package makes whole tens
            "cifar10": 50000,
            "cifar100": 50000,
            "mnist": 60000,
            "fashion_mnist": 60000,
            "ptb": (self.ptb_train_tokens - 1) // self.bptt,
            "synthetic_images": self.synthetic_train,
            "synthetic_text": (self.ptb_train_tokens - 1) // self.bptt,
        }[self.source] if self.source not in ("arrays", "text", "python") else self._source_train()
        n = full - self.default_valid_size()
        if n <= 0:
            raise ValueError(f"valid_size {self.default_valid_size()} leaves no training examples of {full}")
        return min(n, self.max_train) if self.max_train else n


# ---------------------------------------------------------------------------------------- model
class ModelConfig(Strict):
    """The network: a built-in model (:data:`MODEL_NAMES`) or your own class by import path, with its kwargs."""
    name: str = Field(description="A built-in model or 'package.module:Class' for your own nn.Module.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the model.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.name not in MODEL_NAMES and not re.fullmatch(r"[\w.]+:\w+", self.name):
            raise ValueError(
                f"unknown model {self.name!r}: use one of {', '.join(MODEL_NAMES)} or 'module:Class'"
            )
        return self


# ------------------------------------------------------------------------------------ optimiser
class ScheduleConfig(Strict):
    """Learning-rate schedule. ``plateau`` with early stopping is the paper's long NSGD protocol;
    ``warmup_cosine`` and ``warmup_constant`` are the transformer recipe: η rises linearly over
    ``warmup_steps`` updates from ``warmup_start``·η to η, then decays along a half cosine to
    ``final_factor``·η at the run's last step, or stays at η."""

    omit_at_default = ("warmup_steps", "warmup_start", "final_factor")

    kind: Literal["constant", "step", "plateau", "warmup_cosine", "warmup_constant"] = "constant"
    milestones: list[PositiveFloat] = Field(default_factory=list, description="step: epochs where lr *= factor.")
    factor: float = Field(0.1, gt=0, le=1, description="Multiplier at a milestone or a plateau.")
    patience: PositiveInt = Field(100, description="plateau: epochs without val-loss improvement.")
    early_stop: PositiveInt | None = Field(
        None, description="Stop after this many epochs without val-accuracy improvement (None: never)."
    )
    warmup_steps: NonNegativeInt = Field(0, description="warmup_*: updates of the linear warmup (W ≥ 1).")
    warmup_start: float = Field(0.01, gt=0, le=1, description="warmup_*: the first update's η, as a fraction of η.")
    final_factor: float = Field(0.0, ge=0, le=1, description="warmup_cosine: the decay's floor, as a fraction of η.")

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        warmup = self.kind.startswith("warmup")
        if warmup and self.warmup_steps < 1:
            raise ValueError(f"kind {self.kind} needs warmup_steps ≥ 1")
        if not warmup and self.warmup_steps:
            raise ValueError(f"warmup_steps is for the warmup_cosine and warmup_constant kinds, not {self.kind}")
        return self


class NSGDConfig(Strict):
    """Nudged-SGD: learning rate gamma*lr along the top-k Hessian directions."""

    gamma: NonNegativeFloat = 1.0
    k: PositiveInt = 10
    variant: Literal["correct_v", "correct_g", "correct_both"] = "correct_v"
    subspace: Literal["top", "random"] = Field("top", description="'random': the random-subspace control.")
    refresh_every_steps: PositiveInt | None = Field(None, description="None: refresh once per epoch.")
    tol: PositiveFloat = Field(1e-3, description="Relative residual of the refreshed eigenpairs.")
    hessian_examples: PositiveInt | None = Field(None, description="None: the dataset's hessian_subset.")


class SAMConfig(Strict):
    """Sharpness-aware minimisation (Foret et al. 2021): the gradient at the worst point of a ρ-ball;
    ``adaptive``: ASAM (Kwon et al. 2021), the ball scaled by |w| + eta."""

    rho: PositiveFloat = Field(0.05, description="The radius ρ of the ascent.")
    adaptive: bool = Field(False, description="ASAM: ε = ρ·T²g/‖Tg‖ with T = |w| + eta.")
    eta: NonNegativeFloat = Field(0.01, description="ASAM's η in T = |w| + η.")


class OptimizerConfig(Strict):
    """The optimizer, its learning rate η, batch size S, schedule and clipping; Nudged-SGD's or Adam's own settings."""
    omit_at_default = ("betas", "eps", "sam")

    name: Literal["sgd", "nsgd", "adam", "adamw", "sam"] = Field(
        "sgd", description="sgd | nsgd (Nudged-SGD) | adam | adamw (torch's; betas, eps; momentum must be 0) | "
        "sam (SGD at the worst point of a ρ-ball: two gradients per step; settings under sam)."
    )
    lr: PositiveFloat = Field(0.01, description="Learning rate η.")
    batch_size: PositiveInt | Literal["full"] = Field(128, description="S, or 'full' for full-batch GD.")
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat | None = Field(None, description="Clip the gradient norm (PTB: 5).")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    nsgd: NSGDConfig | None = None
    sam: SAMConfig | None = None
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's (β1, β2), each in [0, 1).")
    eps: PositiveFloat = Field(1e-8, description="Adam's ε.")

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        if self.name == "nsgd" and self.nsgd is None:
            self.nsgd = NSGDConfig()
        if self.name != "nsgd" and self.nsgd is not None:
            raise ValueError(f"'nsgd' settings given but optimizer.name is {self.name!r}")
        if self.name == "sam" and self.sam is None:
            self.sam = SAMConfig()
        if self.name != "sam" and self.sam is not None:
            raise ValueError(f"'sam' settings given but optimizer.name is {self.name!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if self.adaptive and self.momentum:
            raise ValueError(f"momentum is for sgd/nsgd; {self.name} takes betas (β1 is its momentum)")
        return self

    @property
    def adaptive(self) -> bool:
        """Adam or AdamW: a diagonal preconditioner sqrt(v̂) + ε."""
        return self.name in ADAPTIVE_OPTIMIZERS


# ------------------------------------------------------------------------------------------ run
class CheckpointConfig(Strict):
    """Where checkpoints are dumped: dense early ("zoom"), then every few epochs, optionally log-spaced."""

    zoom_every: NonNegativeInt = Field(0, description="Steps between zoom checkpoints (0: no zoom).")
    zoom_until: NonNegativeFloat = Field(1.0, description="Epoch at which the zoom phase ends.")
    every_epochs: PositiveFloat | None = Field(1.0, description="Epochs between regular checkpoints.")
    log_points: NonNegativeInt = Field(0, description="Extra log-spaced checkpoints over the whole run.")
    max_checkpoints: PositiveInt = Field(2000, description="Refuse schedules longer than this.")
    best: bool = Field(
        False, description="Also keep the weights with the best validation accuracy (validated at every epoch "
        "end) as checkpoints/best.pt, with train/test rows in the metrics and its spectrum "
        "(runs/{run}/spectrum_best.parquet): the paper's best-validation quantities at the exact epoch."
    )


class EvalConfig(Strict):
    """The full evaluations of the train, validation and test splits at checkpoints (and epoch ends)."""
    batch_size: PositiveInt = Field(2000, description="Examples per forward pass when evaluating.")
    valid_every_epoch: bool = Field(
        True, description="Evaluate and record the validation split at every epoch end (train/valid/test are "
        "always evaluated at checkpoints); false: at checkpoints only (and where a plateau schedule, early "
        "stopping or checkpoints.best needs it)."
    )
    max_examples: PositiveInt | None = Field(
        None, description="Evaluate train/valid/test on at most this many examples each (None: all)."
    )


class RunConfig(Strict):
    """Everything that defines one training run (and so its checkpoints)."""

    omit_at_default = ("world_size",)

    dataset: Name
    model: ModelConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    epochs: PositiveFloat | None = None
    steps: PositiveInt | None = None
    seed: int = 0
    augment: bool = Field(False, description="Random 4-px shifts + horizontal flips (images only).")
    loss: Literal["cross_entropy", "mse"] = Field(
        "cross_entropy",
        description="Training loss, and the loss every Hessian of the run is taken of: 'cross_entropy' "
        "(nats), or 'mse', the mean over examples of ½‖z − onehot(y)‖² (Cohen et al. 2021's square loss).",
    )
    train_subset: PositiveInt | None = Field(
        None,
        description="Train on the first n examples only (not with the spectrum or NSGD, whose Hessian subset "
        "is drawn from the whole training split: use the dataset's max_train there).",
    )
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt | None = Field(None, description="torch CPU threads (None: Snakemake's threads).")
    world_size: PositiveInt = Field(
        1,
        description="Processes that train the run together (data parallel over torch.distributed; NCCL on "
        "CUDA, gloo on the CPU): each takes a contiguous slice of every mini-batch, the same batches in the "
        "same order as one process, and one all-reduce per gradient gives the whole batch's mean gradient, "
        "so the updates are one process's up to floating-point reduction order. More than 1: the workflow "
        "starts `sharpflow train` under resources.train.launcher (torchrun or srun) with this many ranks.",
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of 'epochs' and 'steps'")
        return self


# ------------------------------------------------------------------------------------- analyses
class SpectrumConfig(Strict):
    """Top-k Hessian eigenpairs at every checkpoint."""

    k: PositiveInt = 10
    n: PositiveInt | None = Field(None, description="Hessian examples (None: the dataset's hessian_subset).")
    tol: PositiveFloat = Field(1e-3, description="Relative residual ‖Hv−λv‖/|λ| every pair must reach.")
    which: Literal["LA", "LM"] = Field("LA", description="Largest algebraic or largest magnitude.")
    backend: Literal["lanczos", "arpack"] = "lanczos"
    max_matvecs: PositiveInt | None = Field(
        None,
        description="Budget of Hessian-vector products per solve (None: 1000 + 50k). A solve that runs "
        "out reports its pairs with converged = False.",
    )
    warm_chain: NonNegativeInt = Field(
        8,
        description="Warm-start each checkpoint from the previous one's eigenvectors, in chains of this "
        "many checkpoints (chains run in parallel; 0: always cold).",
    )
    frobenius_probes: NonNegativeInt = Field(0, description="Gaussian probes for ‖H‖_F (0: skip).")
    trace_probes: NonNegativeInt = Field(0, description="Hutch++ probes for tr(H) (0: skip).")
    eigvec_dtype: Literal["float32", "float16"] = "float32"
    chunk_size: PositiveInt | None = Field(None, description="Examples per HVP chunk (bounds memory).")
    eval_mode: bool = Field(True, description="Hessian of the inference-mode model (BN/dropout off).")
    augment: Literal["none", "fixed"] = Field(
        "none",
        description="For runs with augment: true, the images the Hessian is taken over: 'none', the raw "
        "Hessian subset; 'fixed', one augmented copy of it drawn per checkpoint (seeded by the step, the same "
        "for every product of that checkpoint), as the paper drew a fresh augmented sample per computation.",
    )

    @model_validator(mode="after")
    def _check(self) -> SpectrumConfig:
        # The estimators report a standard error: Gaussian probes need two, Hutch++ four (a third
        # sketch, a third exact, two for Hutchinson). Say so here rather than deep inside a job.
        if self.frobenius_probes == 1:
            raise ValueError("frobenius_probes: 1 gives no standard error; use 0 (skip) or at least 2")
        if 0 < self.trace_probes < 4:
            raise ValueError(f"trace_probes: {self.trace_probes} is too few for Hutch++; use 0 (skip) or at least 4")
        return self


class StageResources(Strict):
    """What one stage's job asks the scheduler for (Snakemake resources; a profile may override them)."""

    omit_at_default = ("launcher", "world_size")

    threads: PositiveInt = 1
    mem_mb: PositiveInt = 2000
    runtime: PositiveInt = Field(60, description="Minutes (used by SLURM).")
    gpu: NonNegativeInt = Field(1, description="GPUs the job asks for (Snakemake resource 'gpu').")
    gpu_model: str | None = Field(None, description="SLURM GPU type (sbatch --gpus=<model>:<gpu>); None: any.")
    launcher: Literal["torchrun", "srun"] = Field(
        "torchrun",
        description="train (runs with world_size > 1) and spectrum (its world_size > 1): what starts the job's "
        "ranks. 'torchrun': `torchrun --standalone` on one machine (also inside one SLURM job on one node); "
        "'srun': one SLURM task per rank (the job asks for world_size tasks, which may span nodes). threads, "
        "mem_mb and gpu are per rank there (the job asks for world_size times them).",
    )
    world_size: PositiveInt = Field(
        1,
        description="spectrum only: processes per analysis job (`sharpflow analyse` under launcher), each "
        "computing the Hessian products on its shard of the Hessian subset, one all-reduce per product; the "
        "same eigenpairs as one process up to the order of the sums. Only the spectrum (top-k, Frobenius "
        "norm, trace) runs this way: with world_size > 1 every other analysis must be off, and "
        "runs_per_job must be 1. threads, mem_mb and gpu are per rank.",
    )



#: Built-in models with BatchNorm: in training mode it needs more than one example per batch.
BATCHNORM_MODELS = frozenset({"vgg11_bn"})


def check_batchnorm_batches(run: str, cfg: RunConfig, n_train: int) -> None:
    """A BatchNorm model fails on a last mini-batch of one example (one value per channel at its
    1×1 feature map), at the end of the first epoch; say so when the config is read instead."""
    bs = cfg.optimizer.batch_size
    if cfg.model.name not in BATCHNORM_MODELS or bs == "full":
        return
    n = cfg.train_subset or n_train
    if n > bs and n % bs == 1:
        raise ValueError(
            f"run {run}: {n} training examples in batches of {bs} leave a last batch of one example, "
            f"which {cfg.model.name}'s BatchNorm cannot train on; change batch_size or train_subset"
        )


def check_hessian_subset_is_trained_on(run: str, cfg: RunConfig, n_train: int) -> None:
    """The Hessian subset is drawn from the whole training split; a run that trains on its first n
    examples only would have its curvature measured mostly on examples it never saw."""
    if cfg.train_subset is not None and cfg.train_subset < n_train:
        raise ValueError(
            f"run {run}: train_subset {cfg.train_subset} trains on the first {cfg.train_subset} of "
            f"{n_train} examples, but the Hessian subset (spectrum, NSGD refreshes, escape) is drawn "
            f"from all {n_train}, mostly examples the run never sees; use a dataset with max_train: "
            f"{cfg.train_subset} instead (its Hessian subset is drawn from those examples)"
        )


# ---------------------------------------------------------------------------------- run naming
ALIASES = {
    "optimizer.lr": "lr",
    "optimizer.batch_size": "bs",
    "optimizer.momentum": "mom",
    "optimizer.weight_decay": "wd",
    "optimizer.nsgd.gamma": "gamma",
    "optimizer.nsgd.k": "k",
    "optimizer.nsgd.subspace": "sub",
    "optimizer.sam.rho": "rho",
    "optimizer.schedule.warmup_steps": "wu",
    "optimizer.name": "",
    "model.name": "",
}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.]", "_", text)


def run_id(study: str, point: dict[str, Any]) -> str:
    """A stable, readable id: the study name, then ``{alias}{value}`` per swept field.

    It depends only on the study name and this run's own sweep values, so adding a value to
    a sweep adds runs without renaming (or invalidating) the others.
    """
    parts = [study]
    for key, value in point.items():
        alias = ALIASES.get(key, key.rsplit(".", 1)[-1])
        parts.append(f"{alias}{_fmt(value)}")
    return "-".join(parts)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``, nested mappings key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def study_of(run: str) -> str:
    """The study a run id belongs to: the part before the first ``-``."""
    return run.split("-", 1)[0]



# ------------------------------------------------------------------------------ step arithmetic
def steps_per_epoch(run: RunConfig, dataset: DatasetConfig) -> int:
    """Updates per epoch: the training examples the run uses over its batch size, rounded up (1 for full batch)."""
    n = dataset.train_size()
    if run.train_subset is not None:
        if run.train_subset > n:
            raise ValueError(f"train_subset {run.train_subset} exceeds the {n} training examples")
        n = run.train_subset
    bs = run.optimizer.batch_size
    return 1 if bs == "full" or bs >= n else math.ceil(n / bs)


def total_steps(run: RunConfig, dataset: DatasetConfig) -> int:
    """The run's length in updates: ``steps``, or ``epochs`` × steps per epoch rounded (at least 1)."""
    if run.steps is not None:
        return run.steps
    assert run.epochs is not None
    return max(1, round(run.epochs * steps_per_epoch(run, dataset)))


def checkpoint_steps(run: RunConfig, dataset: DatasetConfig) -> list[int]:
    """Every step at which the run dumps a checkpoint: a pure function of the config.

    Step 0 (the initialisation) and the last step are always included; in between, every
    ``zoom_every`` steps up to epoch ``zoom_until``, every ``every_epochs`` epochs, and
    ``log_points`` log-spaced steps.
    """
    spe = steps_per_epoch(run, dataset)
    last = total_steps(run, dataset)
    ck = run.checkpoints
    steps = {0, last}
    if ck.zoom_every:
        steps.update(range(0, min(last, round(ck.zoom_until * spe)) + 1, ck.zoom_every))
    if ck.every_epochs:
        every = max(1, round(ck.every_epochs * spe))
        steps.update(range(0, last + 1, every))
    if ck.log_points:
        for i in range(ck.log_points):
            steps.add(min(last, round(math.exp(math.log(last) * (i + 1) / ck.log_points))))
    out = sorted(s for s in steps if 0 <= s <= last)
    if len(out) > ck.max_checkpoints:
        raise ValueError(
            f"the checkpoint schedule has {len(out)} steps, over checkpoints.max_checkpoints "
            f"= {ck.max_checkpoints}"
        )
    return out


# -------------------------------------------------------------------------------- serialising
def format_errors(err: ValidationError) -> str:
    """A pydantic validation error as one line: ``field.path: message`` per problem, ``; `` between them."""
    msgs = []
    for e in err.errors():
        # repr() keys with control characters, so the message stays one readable line
        loc = ".".join(str(p) if str(p).isprintable() else repr(p) for p in e["loc"]) or "(top level)"
        msg = " ".join(e["msg"].removeprefix("Value error, ").split())
        msgs.append(f"{loc}: {msg}")
    return "; ".join(msgs)


def dump_json(model: BaseModel) -> str:
    """The canonical JSON of a stage config, as passed from Snakemake to the CLI."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
