"""The training configuration's schema: one dataclass per section, every key with its type, default and meaning.
Values are checked in forde.config.validation, YAML and overrides merged in forde.config.loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

CORRUPTION_SELECTIONS = ("all", "benchmark", "none")
MAX_IMAGE_PIXELS = 4096 * 4096  # per image file decoded; Tiny-ImageNet's are 64 x 64
KERNEL_METHODS = ("forde", "rde_weight", "rde_function", "rde_feature")  # methods with a median-heuristic kernel


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar100 | tinyimagenet | a name given to `forde data import-folder`
    root: str = "${oc.env:FORDE_DATA,data}"  # datasets, imported folders, PCA caches and -C sets live here
    download: bool = False  # download CIFAR-10/100 or Tiny-ImageNet into `root` when it is missing
    val_fraction: float = 0.0  # share of the training set held out for validation (model selection, pruning)
    split_seed: int = 0  # the train/validation split and the subsets below depend on this seed only
    train_subset: int | None = None  # train on this many training samples, a class-stratified draw (null = all)
    test_subset: int | None = None  # evaluate on this many test samples, the same draw for every corrupted set
    augment: bool = True  # random crop (padding 4) and horizontal flip on the device; images only
    on_device: bool = True  # keep the whole training set on the training device as uint8
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decoding image files: any larger image is refused (a bomb, a mistake)


Execution = Literal["loop", "vmap"]
RESNET18_BLOCKS = (2, 2, 2, 2)
BLOCK_MODELS = ("resnet18", "preact_resnet18")  # the models whose depth model.blocks sets
BUILTIN_MODELS = ("mlp", "resnet18", "preact_resnet18", "wrn16_4")
MODEL_FORMS = "mlp, resnet18, preact_resnet18, wrn16_4, timm:NAME or PACKAGE.MODULE:CALLABLE"


@dataclass
class ModelConfig:
    name: str = "mlp"  # a built-in network, timm:NAME, or PACKAGE.MODULE:CALLABLE (your own; see docs/models.md)
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of timm's or your network's constructor
    width: int = (
        64  # channels of the first residual stage (64 = the paper's nets; 16 = the small ResNet of the benchmarks)
    )
    hidden: list[int] = field(default_factory=lambda: [128, 128, 128])  # MLP hidden layer sizes
    blocks: list[int] = field(
        default_factory=lambda: list(RESNET18_BLOCKS)
    )  # residual blocks per stage ([1,1,1,1]: ResNet10)
    zero_init_classifier: bool = False  # the release's classifier layer starts at zero (weights and bias)
    execution: Literal["auto", "loop", "vmap"] = (
        "auto"  # members one after another, or vectorised (same results); auto: the device's default
    )


GradTarget = Literal["logit", "log_prob"]
MedianMode = Literal["per_column", "all_pairs"]
AlphaMix = Literal["precision", "lengthscale"]


@dataclass
class MethodConfig:
    name: Literal["de", "forde", "rde_weight", "rde_function", "rde_feature", "lit", "swag", "node_bnn"] = "forde"
    alpha: float = 1.0  # lengthscale mix between identity (0) and PCA (1) lengthscales, see alpha_mix
    alpha_mix: AlphaMix = "precision"  # mix Sigma^-1 (w = 1-a + a*lambda) or Sigma (w = 1/(1-a + a/lambda))
    bandwidth_scale: float = 1.0  # multiplies the median-heuristic bandwidth
    bandwidth: float | None = None  # a fixed bandwidth instead of the median heuristic
    median: MedianMode = "per_column"  # median over i per kernel column j (release), or all (i, j) (paper)
    eps: float = 1e-12  # s = g / sqrt(|g|^2 + eps^2)
    grad_target: GradTarget = "logit"  # which true-class output is differentiated w.r.t. x
    repulsion_every: int = 1  # FoRDE: add the repulsion (scaled by k) on every k-th step only; plain steps between
    repulsion_subset: float = 1.0  # FoRDE: share of each batch whose input gradients build the kernel
    repulsion_ramp_start: float = 1.0  # FoRDE: repulsion weight in epoch 0, falling linearly to 1 ...
    repulsion_ramp_epochs: int = 0  # ... over this many epochs (the release's first commit: 100 over 80)
    lit_weight: float = 1.0  # LIT: weight of the squared-cosine penalty on input gradients
    feature_prior_scale: float = 1e-3  # Feature-RDE: Cauchy prior sum log(1 + s f^2) on the features (CIFAR-100: 5e-3)
    feature_projection_dim: int = 5  # Feature-RDE: directions the features are projected on for the kernel
    feature_shared_head: bool = True  # Feature-RDE: one classifier shared by the members (the authors' code)
    swag_start: float = 0.537  # SWAG: collect moments after this share of the epochs, once per epoch (161 of 300)
    swag_rank: int = 20  # SWAG: deviations kept for the low-rank covariance (0 = diagonal only)
    swag_samples: int = 30  # SWAG: draws per member at evaluation, batch norm refreshed for each
    swag_scale: float = 0.5  # SWAG: covariance scale of the draws
    node_components: int = 4  # node-BNN: K, components of the variational mixture on the unit multipliers
    node_prior_std: float = 0.4  # node-BNN: prior N(1, s^2) on the multipliers (ResNet18; PreActResNet18: 0.3)
    node_init_std: float = 0.4  # node-BNN: the components' standard deviations start near this
    node_gamma: float = 1.0  # node-BNN: weight of the extra entropy term (H_BD[q] counted 1 + gamma times)
    node_kl_ramp: float = 0.667  # node-BNN: the KL weight rises linearly to 1 over this share of the epochs
    node_train_samples: int = 4  # node-BNN: noisy copies of each training example per step
    node_test_samples: int = 8  # node-BNN: draws per component at evaluation (K times as many passes)
    node_lr: float = 0.1  # node-BNN: constant learning rate of the variational parameters


_KERNEL = ("bandwidth_scale", "bandwidth", "grad_target")
METHOD_KEYS: dict[str, tuple[str, ...]] = {  # the method.* keys each method reads (grad_target: the diversity metric)
    "de": ("grad_target",),
    "forde": (
        *_KERNEL,
        *("alpha", "alpha_mix", "median", "eps", "repulsion_every", "repulsion_subset"),
        *("repulsion_ramp_start", "repulsion_ramp_epochs"),
    ),
    "rde_weight": _KERNEL,
    "rde_function": _KERNEL,
    "rde_feature": (*_KERNEL, "feature_prior_scale", "feature_projection_dim", "feature_shared_head"),
    "lit": ("grad_target", "eps", "lit_weight"),
    "swag": ("grad_target", "swag_start", "swag_rank", "swag_samples", "swag_scale"),
    "node_bnn": (
        "grad_target",
        *("node_components", "node_prior_std", "node_init_std", "node_gamma", "node_kl_ramp"),
        *("node_train_samples", "node_test_samples", "node_lr"),
    ),
}


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: int = 300
    lr_ratio: float = 0.01  # final lr = lr * lr_ratio
    decay_start: float = 0.5  # fraction of training where the linear decay starts
    decay_end: float = 0.9  # fraction of training where it reaches lr * lr_ratio
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr over this many epochs


@dataclass
class EvalConfig:
    batch_size: int = 1000
    every: int = 1  # evaluate the validation (else test) set every N epochs
    corruptions: list[str] = field(default_factory=lambda: ["all"])  # all | benchmark | none | explicit names
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    corrupted_root: str | None = None  # where the -C set lives (default: <data.root>/<dataset>-C)
    generate_corrupted: bool = True  # build the -C set locally when it is missing
    grad_samples: int = 1000  # samples per set used for the input-gradient diversity metric (0 = off)
    ood: list[str] = field(default_factory=lambda: ["gaussian_noise", "uniform_noise"])  # OOD sets scored ([] = none)
    calibrate: bool | None = None  # temperature scaling on the validation split; null: when there is one
    calibrate_members: bool = False  # one temperature per member (each member calibrated, then averaged)


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online when logged in, else offline
    project: str = "forde"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds to wait for an online W&B run to start before logging offline instead


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str | None = None  # run directory name; default: <dataset>-<method>-M<size>-seed<seed>
    resume: bool = True  # continue from the run directory's last checkpoint when there is one
    restart: bool = (
        False  # the run directory holds another config (e.g. a diverged lr): start over, old files kept in previous-N/
    )
    progress: bool = True  # per-epoch progress bar
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # one run over several processes (torchrun, srun): data = every process all members and a share of each batch;
    # members = every process a share of the members and the whole batch (forde.distributed)
    distributed: str = "data"
    collective_timeout_s: float = 1800.0  # a collective waiting longer (a rank hung) ends the run with an error


@dataclass
class CudaConfig:
    """Speed settings that only CUDA devices have (ignored on the CPU)."""

    tf32: bool = True  # TF32 tensor cores in convolutions (PyTorch's default); matrix products stay IEEE float32
    cudnn_benchmark: bool = True  # cuDNN times its algorithms for each new input shape and keeps the fastest
    graphs: bool = False  # capture each kind of training step (forward + backward) once as a CUDA graph and replay it


# What `auto` means for precision, channels_last and model.execution on each kind of device: the fastest
# measured setting that passes the equivalence tests. CPU: benchmarks/README.md. CUDA: to be set from the
# table that benchmarks/gpu_check.sh writes (benchmarks/results/step_time-cuda.md); until GPU timings exist
# it is PyTorch's plain setting.
DEVICE_DEFAULTS = {
    "cpu": {"precision": "fp32", "channels_last": False, "execution": "loop"},
    "cuda": {"precision": "fp32", "channels_last": False, "execution": "loop"},
}


@dataclass
class TrainConfig:
    seed: int = 0
    ensemble_size: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 autocast needs CUDA; auto: the device's default
    channels_last: bool | None = None  # channels-last memory format for convolutional nets; null: the device's default
    cuda: CudaConfig = field(default_factory=CudaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
