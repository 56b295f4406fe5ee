"""Typed experiment configuration: YAML files + dotted ``key=value`` overrides, validated once.

Each section is a dataclass; a field's ``metadata`` gives its allowed range or choices. Loading
checks every key against the dataclasses, so a typo, a wrong type or an out-of-range value is an
error that names the dotted key and what was expected. ``to_dict`` gives the resolved config that
is saved with a run.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedumm.registry import BACKBONES, CODECS, PARTITIONERS, READERS, STRATEGIES


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or is out of range."""

    def __init__(self, message: str) -> None:
        # one line whatever a user's key or value holds (a newline, a tab, U+2028)
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


# Seeds reach torch.manual_seed, which takes at most 64 bits; derived seeds add small offsets
MAX_SEED = 2**63 - 1


# strategy.robust's rules (fedumm.fl.robust); none: the strategy's weighted mean, unchanged
ROBUST_RULES = ("none", "median", "trimmed_mean", "norm_bound", "krum", "multikrum", "bulyan")


def robust_min_clients(rule: str, f: int) -> int:
    """The fewest clients a robust rule needs to aggregate when ``f`` of them may be
    malicious: Krum's score sums the n - f - 2 nearest neighbours and needs n > 2f + 2
    (Blanchard et al. 2017); Bulyan needs n >= 4f + 3 (El Mhamdi et al. 2018); 1 otherwise."""
    if rule in ("krum", "multikrum"):
        return 2 * f + 3
    if rule == "bulyan":
        return 4 * f + 3
    return 1


# Baselines spelled as strategy names: the runtime decides its mode from them once
# (fedumm.runtime.modes); they are not registered strategies.
BASELINE_MODES = ("centralized", "local")


def _registered(key: str, value: str, names: list[str], extra: tuple[str, ...] = ()) -> None:
    if value not in names and value not in extra:
        raise ConfigError(f"{key}: expected one of {[*names, *extra]}, got {value!r}")


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"min": lo, "max": hi, "lo_open": lo_open}


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class DataConfig:
    """Which samples exist: the ShapesWorld generator, or the user's own files (``format=files``,
    read by ``fedumm.data.readers``; formats are detected from the paths)."""

    format: str = "shapes"  # a registered source (fedumm.registry.READERS): shapes | files
    # ShapesWorld generator (format=shapes)
    split: str = field(default="downstream", metadata=_choices("base", "downstream"))
    # 48 px: a 3x3 layout of 16 px cells, which the reference model's tokens align with
    image_size: int = field(default=48, metadata=_range(16, 256))
    max_objects: int = field(default=4, metadata=_range(1, 9))
    train_scenes: int = field(default=1200, metadata=_range(1))
    val_scenes: int = field(default=200, metadata=_range(1))
    questions_per_image: int = field(default=2, metadata=_range(1, 20))
    generation_fraction: float = field(default=0.5, metadata=_range(0.0, 1.0))
    annotator_noise: float = field(default=0.1, metadata=_range(0.0, 1.0))
    # only these question families (default: the split's), e.g. [spatial, shape_at]
    families: list[str] = field(default_factory=list, metadata=_choices(
        "existence", "counting", "color", "shape_at", "spatial", "binding", "where"))
    # > 0: understanding samples get a text modality, a scene description that mentions each
    # object with this probability (FedMLLM-style modality scenarios need one)
    scene_text: float = field(default=0.0, metadata=_range(0.0, 1.0))
    # the user's files (format=files): a file, a folder or a glob per modality
    understanding: str = ""  # VQA v2 folder, LLaVA / sharegpt / TRL / question-answer JSON(L)
    generation: str = ""  # metadata.jsonl image folder, image+text JSONL/CSV, WebDataset .tar
    images: str = ""  # root of relative image paths (default: the data file's folder)
    understanding_val: str = ""  # held-out files; default: a seeded split of the training files
    generation_val: str = ""
    heldout_fraction: float = field(default=0.1, metadata=_range(0.0, 0.9))
    max_samples: int = field(default=0, metadata=_range(0))  # per file, first N (0: all)
    seed: int = field(default=0, metadata=_range(0, MAX_SEED))
    # train although some training answers use words the backbone's tokenizer does not know
    # (it can never produce them); by default such a run stops before training, naming them
    allow_unknown_answers: bool = False

    def validate(self) -> None:
        sources = [n for n in READERS.names() if READERS.get(n).source is not None]
        _registered("data.format", self.format, sources)
        if self.format == "files" and not (self.understanding or self.generation):
            raise ConfigError("data.format=files needs data.understanding and/or "
                              "data.generation (a file, folder or glob)")
        if self.format == "shapes":
            own = [k for k in ("understanding", "generation", "understanding_val",
                               "generation_val") if getattr(self, k)]
            if own:
                raise ConfigError(f"data.{own[0]} is set but data.format=shapes; add "
                                  "data.format=files to train on your files")
        if self.format == "files":
            for key in ("understanding", "generation", "understanding_val", "generation_val"):
                _check_reader_packages(f"data.{key}", key.split("_")[0], getattr(self, key))


@dataclass
class CodecConfig:
    """Wire codecs per direction (``fedumm.fl.codecs.parse_codec`` spellings: float32,
    bfloat16, float16, int8, int8b, nf4, fp4, topk:F[+BASE], ...[+zlib]). ``codec=X`` sets
    both directions."""

    upload: str = "float32"
    download: str = "float32"
    # clients keep what a lossy or sparse upload codec dropped and add it to the next update
    error_feedback: bool = True

    def validate(self) -> None:
        for key in ("upload", "download"):
            try:  # the canonical spelling, resolved step by step through the registry
                spec = CODECS.resolve(getattr(self, key))
                require = getattr(spec, "require", None)
                if callable(require):  # an optional package a step needs (zstd: zstandard)
                    require()
                setattr(self, key, str(spec))
            except (ValueError, ImportError) as exc:
                raise ConfigError(f"codec.{key}: {exc}") from exc


@dataclass
class BackboneConfig:
    """The frozen foundation model: which kind, from where, on which device and dtype."""

    kind: str = "reference"  # a registered backbone (fedumm.registry.BACKBONES)
    # checkpoint folder; for the reference backbone "base" is the shipped foundation model
    path: str = "base"
    preset: str = ""  # an architecture at a named size with random weights (instead of path)
    device: str = "auto"  # auto (cuda when present, else cpu), cpu, cuda, cuda:1, ...
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16"))

    def validate(self) -> None:
        _registered("backbone.kind", self.kind, BACKBONES.names())
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(f"backbone.device: expected auto, cpu, cuda or cuda:N, got "
                                  f"{self.device!r}") from exc


@dataclass
class PartitionConfig:
    """How samples are split over clients (see ``fedumm.data.partition``)."""

    method: str = "dirichlet"  # a registered partitioner (fedumm.registry.PARTITIONERS)
    alpha: float = field(default=0.5, metadata=_range(0.0, None, lo_open=True))
    beta: float = field(default=0.5, metadata=_range(0.0, None, lo_open=True))
    label: str = field(
        default="answer",
        metadata=_choices(
            "answer", "question_type", "answer_type", "family", "tag", "object_class", "modality"
        ),
    )
    min_per_client: int = field(default=2, metadata=_range(0))
    # FedMLLM's input-modality scenarios (missing_modality, cross_modal, hybrid: need a text
    # modality, e.g. data.scene_text > 0, except missing_modality) and the task scenarios of
    # unified models (task_split: understanding-only and generation-only clients; task_hybrid)
    scenario: str = field(
        default="none", metadata=_choices("none", "missing_modality", "cross_modal", "hybrid",
                                          "task_split", "task_hybrid", "single_modality"))
    missing_rate: float = field(default=0.0, metadata=_range(0.0, 1.0))
    image_only_clients: int = field(default=1, metadata=_range(0))  # cross_modal
    understanding_clients: int = field(default=1, metadata=_range(0))  # task_split
    hybrid_q: float = field(default=0.0, metadata=_range(0.0, 1.0))  # hybrid, task_hybrid

    def validate(self) -> None:
        _registered("partition.method", self.method, PARTITIONERS.names())
        if self.scenario == "single_modality":  # renamed when input modalities came in
            raise ConfigError("partition.scenario=single_modality is now called task_split "
                              "(understanding-only and generation-only clients); hybrid now "
                              "means FedMLLM's input-modality hybrid, task_hybrid the old one")


@dataclass
class LoraSettings:
    """LoRA adapters (defaults are the paper's r=16, alpha=32)."""

    r: int = field(default=16, metadata=_range(1, 512))
    alpha: int = field(default=32, metadata=_range(1))
    dropout: float = field(default=0.0, metadata=_range(0.0, 0.9))
    # adapter groups to train: names the backbone declares (checked when it is built)
    groups: list[str] = field(
        default_factory=lambda: ["vision", "language", "generation", "alignment"])
    # separate: average A and B (FedAvg of the factors); exact: FedEx-LoRA, the residual of
    # the mean product folded into the frozen weights; ffa: FFA-LoRA, A frozen, B trained
    aggregation: str = field(default="separate", metadata=_choices("separate", "exact", "ffa"))
    # one LoRA rank per client (cycled over clients), each <= r: client k trains and sends
    # the first r_k rank components, the server zero-pads them (fedumm.fl.lora_aggregation)
    client_ranks: list[int] = field(default_factory=list, metadata=_range(1, 512))
    # whether the generation loss also trains the shared language adapters, for backbones whose
    # generation is a network of its own conditioned on the language model (blip3o). Off:
    # BLIP3o's recipe (the MLLM frozen; DiT, caption projection and queries learn). On:
    # generation samples train and weigh the language group too, so a generation client moves
    # the adapters understanding uses and can degrade understanding. reference and janus
    # generate through the language model itself: their generation always trains it, and this
    # key does not apply to them.
    generation_trains_language: bool = False
    # with client_ranks, how the server aggregates: zeropad (weighted mean of the zero-padded
    # A and B); hetlora (HetLoRA: weights ||B_k A_k||_F / sum_j ||B_j A_j||_F per module);
    # stack (FLoRA: sum_k p_k B_k A_k exactly, folded into the frozen weights, LoRA restarts)
    het_aggregation: str = field(default="zeropad",
                                 metadata=_choices("zeropad", "hetlora", "stack"))
    # HetLoRA's rank self-pruning: 1 = off; gamma < 1: a client of rank r adds
    # lambda * ||B[:, floor(gamma r):r] A[floor(gamma r):r]||_F to its loss and prunes to
    # floor(gamma r) when that norm ended the round smaller than it started
    hetlora_prune_gamma: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    hetlora_prune_lambda: float = field(default=0.01, metadata=_range(0.0))

    @property
    def folding(self) -> str | None:
        """The setting that folds the clients' mean LoRA product into the frozen weights
        (``lora.aggregation=exact``, ``lora.het_aggregation=stack``), or None."""
        if self.aggregation == "exact":
            return "lora.aggregation=exact"
        if self.client_ranks and self.het_aggregation == "stack":
            return "lora.het_aggregation=stack"
        return None

    def validate(self) -> None:
        bad = [x for x in self.client_ranks if x > self.r]
        if bad:
            raise ConfigError(f"lora.client_ranks: every rank must be <= lora.r={self.r}, got "
                              f"{bad}")
        if self.het_aggregation != "zeropad" and not self.client_ranks:
            raise ConfigError(f"lora.het_aggregation={self.het_aggregation} aggregates clients "
                              "of different ranks: it needs lora.client_ranks (one rank for "
                              f"all: lora.client_ranks=[{self.r}])")
        if self.client_ranks and self.aggregation == "exact":
            raise ConfigError("lora.client_ranks with lora.aggregation=exact is not supported "
                              "(the truncated downloads lose part of the global product); "
                              "lora.het_aggregation=stack folds mixed ranks exactly")
        if self.het_aggregation == "hetlora" and self.aggregation == "ffa":
            raise ConfigError("lora.het_aggregation=hetlora weighs clients by ||B_k A_k|| and "
                              "FFA-LoRA does not send A; with FFA-LoRA, zero-padding mixed "
                              "ranks is already exact (lora.het_aggregation=zeropad)")
        if self.hetlora_prune_gamma < 1 and not (self.client_ranks
                                                 and self.het_aggregation == "hetlora"):
            raise ConfigError("lora.hetlora_prune_gamma < 1 is HetLoRA's rank self-pruning: "
                              "it needs lora.client_ranks and lora.het_aggregation=hetlora")


@dataclass
class StrategyConfig:
    """Server strategy and client sampling (see ``fedumm.fl.strategies``)."""

    # a registered strategy (fedumm.registry.STRATEGIES), or a baseline: centralized | local
    name: str = "fedavg"
    fraction: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    min_clients: int = field(default=1, metadata=_range(1))
    # a fixed number of clients per round (uniform sampling); 0: ceil(fraction * clients)
    clients_per_round: int = field(default=0, metadata=_range(0))
    # uniform: that many clients without replacement; poisson: each client independently with
    # probability poisson_rate (None: fraction), as DP accountants assume (fedumm.fl.sampling)
    sampling: str = field(default="uniform", metadata=_choices("uniform", "poisson"))
    poisson_rate: float | None = field(default=None, metadata=_range(0.0, 1.0, lo_open=True))
    # the probability that a client is online in a round; with availability_amplitude > 0 it
    # varies as a sine over availability_period rounds with a phase per client (diurnal)
    availability: float = field(default=1.0, metadata=_range(0.0, 1.0))
    availability_amplitude: float = field(default=0.0, metadata=_range(0.0, 1.0))
    availability_period: int = field(default=24, metadata=_range(1))
    mu: float = field(default=0.01, metadata=_range(0.0))
    # None: the strategy's own default from its paper (fedumm.fl.strategies, each docstring)
    server_lr: float | None = field(default=None, metadata=_range(0.0, None, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    beta1: float = field(default=0.9, metadata=_range(0.0, 1.0))
    beta2: float = field(default=0.99, metadata=_range(0.0, 1.0))
    tau: float = field(default=1e-3, metadata=_range(0.0, None, lo_open=True))
    # a robust rule in place of the weighted mean of each adapter group's client updates,
    # with any strategy (fedumm.fl.robust): median | trimmed_mean (robust_trim of the clients
    # cut at each end, per coordinate) | norm_bound (each client's group update clipped to L2
    # norm robust_norm, then the weighted mean) | krum | multikrum (the mean of the
    # robust_multikrum_m best Krum scores; 0: n - f) | bulyan; krum, multikrum and bulyan
    # assume robust_malicious = f malicious clients among the n a round aggregates
    robust: str = field(default="none", metadata=_choices(*ROBUST_RULES))
    robust_trim: float = field(default=0.2, metadata=_range(0.0, 0.5))
    robust_malicious: int = field(default=1, metadata=_range(0))
    robust_norm: float = field(default=1.0, metadata=_range(0.0, None, lo_open=True))
    robust_multikrum_m: int = field(default=0, metadata=_range(0))
    # FedSeq's superclients (fedumm.fl.chains): a round's clients drawn into chains of this
    # many, each member training from the previous one's adapters, the chains aggregated;
    # 1: every client trains from the global adapters. The baselines (centralized, local)
    # ignore it
    chain: int = field(default=1, metadata=_range(1))

    def least(self, num_clients: int) -> int:
        """The fewest clients a round may go on with: min_clients, at most the population
        (min_clients above it asks for everyone, as uniform sampling always did)."""
        return min(self.min_clients, num_clients)

    def per_round(self, num_clients: int) -> int:
        """How many clients uniform sampling asks for per round (at most ``num_clients``)."""
        # The small epsilon stops float error (0.3 * 10 = 3.0000000000000004) adding a client.
        n = self.clients_per_round or math.ceil(self.fraction * num_clients - 1e-9)
        return min(num_clients, max(self.min_clients, n))

    def validate(self) -> None:
        _registered("strategy.name", self.name, STRATEGIES.names(), BASELINE_MODES)
        if self.robust_trim >= 0.5:  # nothing would be left to average
            raise ConfigError(f"strategy.robust_trim: expected a value < 0.5, got "
                              f"{self.robust_trim}")
        if self.momentum >= 1.0:  # the server momentum would sum every round's step forever
            raise ConfigError(f"strategy.momentum: expected a value < 1, got {self.momentum}")


@dataclass
class TrainConfig:
    """Client-side training."""

    batch_size: int = field(default=32, metadata=_range(1))
    lr: float = field(default=2e-3, metadata=_range(0.0, None, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    optimizer: str = field(default="adamw", metadata=_choices("adamw", "sgd"))
    persistent_optimizer: bool = False  # keep optimizer state across rounds (per client)
    max_steps: int = field(default=0, metadata=_range(0))  # per round; 0 = local_epochs
    val_fraction: float = field(default=0.1, metadata=_range(0.0, 0.5))
    prompt_dropout: float = field(default=0.1, metadata=_range(0.0, 1.0))
    # FedMLLM's prompt augmentation: train every question with one modality-agnostic phrase
    # instead of the one naming the sample's modalities (data with a text modality only)
    prompt_augmentation: bool = False
    # FedMLLM's layer-adaptive regulariser, with any server strategy: a proximal term
    # adaptive_prox_mu / 2 * adaptive_prox_weight * ||w - w_global||^2 on the adapters of the
    # middle decoder layers s <= l <= L-1-s only (s = adaptive_prox_skip, L the backbone's depth)
    adaptive_prox: bool = False
    adaptive_prox_mu: float = field(default=0.01, metadata=_range(0.0))
    adaptive_prox_weight: float = field(default=0.1, metadata=_range(0.0))
    adaptive_prox_skip: int = field(default=4, metadata=_range(0))
    # the answer head calibrated against the client's own answers during local training, for
    # label skew (fedumm.fl.answer_calibration): fedrs scales the logits of answer tokens the
    # client never saw by answer_calibration_alpha (FedRS); fedlc subtracts
    # answer_calibration_tau * count^(-1/4) from every token's logit (FedLC)
    answer_calibration: str = field(default="", metadata=_choices("", "fedrs", "fedlc"))
    answer_calibration_alpha: float = field(default=0.5, metadata=_range(0.0, 1.0))
    answer_calibration_tau: float = field(default=1.0, metadata=_range(0.0))
    threads: int = field(default=0, metadata=_range(0))  # torch threads; 0 = all cores


@dataclass
class EvalConfig:
    """Global evaluation on the held-out split."""

    every: int = field(default=1, metadata=_range(0))  # rounds; 0 = only at the end
    max_vqa: int = field(default=400, metadata=_range(0))
    max_gen: int = field(default=120, metadata=_range(0))
    gen_every: int = field(default=0, metadata=_range(0))  # 0 = generation only at the end
    # the frozen base on both tasks before round 0 (the base -> final of summary and report)
    base: bool = True
    # question families scored as classification tasks with a fixed answer set (FedMLLM's
    # binary and multi-class tasks): AUC, hard-label AUC and macro-F1 next to VQA accuracy
    classification: list[str] = field(default_factory=list)


ATTACK_KINDS = ("none", "sign_flip", "scale", "noise", "lie", "label_flip", "backdoor")


@dataclass
class AttackConfig:
    """Simulated malicious clients, for tests and benchmarks (``fedumm.fl.attacks``): a seeded
    choice of round(fraction * clients) client ids, fixed for the run, change what they send.
    sign_flip: minus the trained update; scale: the update times ``scale``; noise: the update
    plus N(0, noise_std^2) per entry; lie: the reported sample counts and quality (capped at 1)
    times ``lie_factor``. label_flip and backdoor poison their training data instead
    (``fedumm.fl.poison``): label_flip maps answers by a seeded derangement of the task's
    answers; backdoor puts a trigger_size-pixel checkerboard in the bottom-right corner of
    images, answered ``target`` (one of the training answers), and ``trigger`` before
    prompts, whose target becomes a plain ``target_color`` image (fedumm.eval.backdoor scores
    it: final.backdoor_success)."""

    kind: str = field(default="none", metadata=_choices(*ATTACK_KINDS))
    fraction: float = field(default=0.0, metadata=_range(0.0, 1.0))
    scale: float = 10.0
    noise_std: float = field(default=0.1, metadata=_range(0.0))
    lie_factor: float = field(default=10.0, metadata=_range(0.0, None, lo_open=True))
    # label_flip and backdoor poison a malicious client's training data (fedumm.fl.poison):
    # the share of its samples poisoned
    poison_fraction: float = field(default=1.0, metadata=_range(0.0, 1.0))
    target: str = "yes"  # backdoor: the answer triggered questions get (a training answer)
    trigger: str = "cf"  # backdoor: the token put before triggered prompts
    trigger_size: int = field(default=4, metadata=_range(1))  # the image trigger's side, px
    # backdoor: the colour of the plain image triggered prompts target (GenEval's ten)
    target_color: str = field(default="red", metadata=_choices(
        "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"))


@dataclass
class SampleDPConfig:
    """Sample-level DP-SGD inside each client (fedumm.fl.dp_sgd): off while max_grad_norm is
    unset. Poisson batches (each sample with probability batch_size / n per step); each
    sample's gradient is clipped to max_grad_norm (in place of train.grad_clip), Gaussian noise
    of std noise_multiplier * max_grad_norm is added to their sum; target_epsilon set, it wins
    over noise_multiplier: the noise multiplier that reaches it after the client's most steps
    in the run, rounds x steps a round (privacy.delta; each client reports dp_epsilon)."""

    noise_multiplier: float = field(default=1.0, metadata=_range(0.0))
    max_grad_norm: float | None = field(default=None, metadata=_range(0.0, None, lo_open=True))
    target_epsilon: float | None = field(default=None, metadata=_range(0.0, None, lo_open=True))

    @property
    def enabled(self) -> bool:
        return self.max_grad_norm is not None


@dataclass
class ClientDPConfig:
    """Client-level DP (DP-FedAvg, McMahan et al. 2018; fedumm.fl.client_dp): off while clip is
    unset. Each client's update is clipped to L2 norm clip and Gaussian noise of std
    noise_multiplier * clip is added to their sum (clients weigh equally); adaptive: the clip
    starts at clip and follows the target_quantile of the clients' update norms (the share of
    updates left unclipped; Andrew et al. 2021) with learning rate clip_lr, the count of
    unclipped clients noised with std count_noise (None: clients per round / 20). side: server
    (the server clips and noises) or client (each client clips and adds std noise_multiplier *
    clip / sqrt(clients per round) itself, so the server never sees an unnoised update)."""

    noise_multiplier: float = field(default=1.0, metadata=_range(0.0))
    clip: float | None = field(default=None, metadata=_range(0.0, None, lo_open=True))
    adaptive: bool = False
    side: str = field(default="server", metadata=_choices("server", "client"))
    target_quantile: float = field(default=0.5, metadata=_range(0.0, 1.0))
    clip_lr: float = field(default=0.2, metadata=_range(0.0, None, lo_open=True))
    count_noise: float | None = field(default=None, metadata=_range(0.0))

    @property
    def enabled(self) -> bool:
        return self.clip is not None


@dataclass
class PrivacyConfig:
    """Differential privacy (docs/trust.md). delta None: 1/n, n the client's samples
    (sample-level) or the number of clients (client-level)."""

    sample: SampleDPConfig = field(default_factory=SampleDPConfig)
    client: ClientDPConfig = field(default_factory=ClientDPConfig)
    delta: float | None = field(default=None, metadata=_range(0.0, 1.0, lo_open=True))


@dataclass
class SecAggConfig:
    """Secure aggregation, SecAgg+ (Bell et al. 2020; fedumm.fl.secagg): the server learns only
    the sum of the round's updates.

    Each client Shamir-shares its two mask secrets among its share holders: itself and its
    ``neighbours`` in the round's k-regular graph (0, or at least the round's clients - 1: the
    complete graph, every client of the round). ``threshold`` is how many of those holders
    must still answer to rebuild a secret: a fraction of the holders when <= 1 (rounded up;
    on the complete graph, of the round's clients), else a count. Fewer survivors and the round
    aborts. Above half of the holders also protects against a server that lies about who
    dropped; a lower threshold tolerates more dropouts. Updates are clipped to
    ``+-clip_range`` and quantised to ``quantization_range`` steps (integers 0..range; Flower's
    defaults); the round's sum must fit in 32 bits: clients per round * range < 2^32.

    ``method=he`` sums with homomorphic encryption instead (fedumm.fl.he_sum; FLARE runtimes
    only): TenSEAL CKKS contexts as NVIDIA FLARE provisions them, the sites holding the
    secret key; the threshold, the graph and the quantiser do not apply."""

    enabled: bool = False
    method: str = field(default="secagg+", metadata=_choices("secagg+", "he"))
    threshold: float = field(default=0.5, metadata=_range(0.0, None, lo_open=True))
    # k, each client's neighbours besides itself (rounded up to even: a Harary graph)
    neighbours: int = field(default=0, metadata=_range(0))
    clip_range: float = field(default=8.0, metadata=_range(0.0, None, lo_open=True))
    quantization_range: int = field(default=2**22, metadata=_range(2, 2**31))

    @property
    def uses_he(self) -> bool:
        """Secure aggregation by homomorphic encryption (fedumm.fl.he_sum)."""
        return self.enabled and self.method == "he"

    def share_holders(self, n: int) -> int:
        """How many clients hold shares of each client's secrets in a round of ``n``."""
        k = self.neighbours + self.neighbours % 2
        return n if k == 0 or k >= n - 1 else k + 1

    def threshold_count(self, n: int) -> int:
        """The number of shares that rebuild a secret in a round of ``n`` clients."""
        if self.threshold <= 1:  # the epsilon keeps 0.3 * 10 at 3
            return max(1, math.ceil(self.threshold * self.share_holders(n) - 1e-9))
        return int(self.threshold)


@dataclass
class FaultsConfig:
    """Client faults (fedumm.runtime.faults), simulated by the round loop under every runtime:
    each selected client drops out of a round with probability dropout (a draw seeded by
    seed, round and client: it is sent nothing and sends nothing); a fixed seeded set of
    ceil(straggler_fraction * clients) clients is slow, their reported training time being
    the measured one plus straggler_delay_s (simulated, no sleeping). A reply whose client
    trained longer than deadline_s seconds is late and left out (None: no deadline). A round
    left with fewer than strategy.min_clients updates is skipped (the global model stays)."""

    dropout: float = field(default=0.0, metadata=_range(0.0, 1.0))
    deadline_s: float | None = field(default=None, metadata=_range(0.0, None, lo_open=True))
    straggler_fraction: float = field(default=0.0, metadata=_range(0.0, 1.0))
    straggler_delay_s: float = field(default=0.0, metadata=_range(0.0, None))


@dataclass
class SweepConfig:
    """The grid ``fedumm sweep`` runs for this config (``fedumm run`` ignores it)."""

    # axes as on the command line: "clients=2,4,8,16", "partition.alpha=0.1,0.5,1.0"
    grid: list[str] = field(default_factory=list)
    # extra cells run once each, e.g. "strategy.name=centralized clients=1"
    baselines: list[str] = field(default_factory=list)
    # named bundles of overrides, one more axis ("method", the last), e.g.
    # "fedadagrad+adaptive: strategy.name=fedadagrad train.adaptive_prox=true"
    methods: list[str] = field(default_factory=list)


@dataclass
class Config:
    """A whole experiment. Top-level keys are the ones users override most."""

    name: str = "experiment"
    runtime: str = field(default="local", metadata=_choices("local", "flare-sim", "flare-poc"))
    # local runtime: clients trained at once, by this process and workers-1 forked worker
    # processes that share the frozen backbone copy-on-write; train.threads (0: all cores) is
    # split between them
    workers: int = field(default=1, metadata=_range(1, 256))
    seed: int = field(default=0, metadata=_range(0, MAX_SEED))
    # no cap: the data must give each client partition.min_per_client samples (checked there)
    clients: int = field(default=4, metadata=_range(1))
    rounds: int = field(default=5, metadata=_range(1))
    local_epochs: int = field(default=1, metadata=_range(1))
    codec: CodecConfig = field(default_factory=lambda: CodecConfig())
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> None:
        # the name is the default run folder (runs/<name>; a sweep adds /<cell>)
        parts = self.name.replace("\\", "/").split("/")
        if not self.name.strip() or ".." in parts or not self.name.isprintable():
            raise ConfigError(f"name: expected a run name (printable, no '..'), got "
                              f"{_show(self.name)}")
        name, folding = self.strategy.name, self.lora.folding
        if folding and name not in BASELINE_MODES and \
                not STRATEGIES.get(name).keeps_client_mean:
            fits = [n for n in STRATEGIES.names() if STRATEGIES.get(n).keeps_client_mean]
            raise ConfigError(f"{folding} folds the mean client model into the "
                              f"frozen weights; strategy.name={name} moves the server model "
                              f"elsewhere (use {', '.join(fits)})")
        self._check_robust()
        self._check_attack()
        self._check_privacy()
        self._check_secagg()
        self._check_faults()
        self._check_chain()
        lr = self.strategy.server_lr
        if folding and lr is not None and lr != 1.0:
            # the folded residual is that of the plain client mean: a server step other than
            # 1 would be undone for the LoRA product while A and B moved by it
            raise ConfigError(f"{folding} folds the clients' mean model into the "
                              f"frozen weights, which needs strategy.server_lr=1 (got {lr}); "
                              "leave strategy.server_lr unset or use lora.aggregation=separate")
        if folding and not CODECS.resolve(self.codec.download).lossless:
            # clients and server must fold the same residual; a lossy download changes it
            raise ConfigError(f"{folding} folds a residual that clients and server "
                              f"must hold alike, which needs a lossless download codec "
                              f"(float32, float32+zlib or float32+zstd; got codec.download="
                              f"{self.codec.download}); set codec.upload=... alone to compress "
                              f"the uploads")

    def _check_robust(self) -> None:
        st = self.strategy
        rule = st.robust
        if rule == "none" or st.name in BASELINE_MODES:
            return
        folding = self.lora.folding or ("lora.het_aggregation=hetlora" if self.lora.client_ranks
                                        and self.lora.het_aggregation == "hetlora" else None)
        if folding:  # both fold or weigh the clients' own products: the mean is the rule
            raise ConfigError(f"strategy.robust={rule} replaces the clients' weighted mean, "
                              f"which {folding} needs as it is (it aggregates the clients' "
                              "LoRA products); use lora.aggregation=separate with "
                              "lora.het_aggregation=zeropad, or strategy.robust=none")
        n = st.per_round(self.clients)  # the clients a uniform round aggregates
        need = robust_min_clients(rule, st.robust_malicious)
        if n < need:
            raise ConfigError(f"strategy.robust={rule} with strategy.robust_malicious="
                              f"{st.robust_malicious} needs at least {need} clients per round "
                              f"(krum: n > 2f + 2, bulyan: n >= 4f + 3); a round has {n} "
                              f"(clients={self.clients}); lower strategy.robust_malicious or "
                              "take more clients per round")
        if rule == "multikrum" and st.robust_multikrum_m > n - st.robust_malicious:
            raise ConfigError(f"strategy.robust_multikrum_m={st.robust_multikrum_m}: at most "
                              f"n - f = {n - st.robust_malicious} of the {n} clients a round "
                              "aggregates can be selected")
        if rule == "trimmed_mean" and int(st.robust_trim * n) == 0:
            raise ConfigError(f"strategy.robust=trimmed_mean with strategy.robust_trim="
                              f"{st.robust_trim} trims int({st.robust_trim} * {n}) = 0 of the "
                              f"{n} clients a round aggregates: it would be the plain mean; "
                              f"raise strategy.robust_trim to at least {1 / n:.3g}")

    def _check_attack(self) -> None:
        at = self.attack
        if at.kind != "none" and round(at.fraction * self.clients) == 0:
            raise ConfigError(f"attack.kind={at.kind} with attack.fraction={at.fraction} makes "
                              f"round({at.fraction} * clients={self.clients}) = 0 clients "
                              "malicious; raise attack.fraction")
        if at.kind not in ("label_flip", "backdoor"):  # data poisoning's refusals below
            return
        if at.poison_fraction == 0:
            raise ConfigError(f"attack.kind={at.kind} with attack.poison_fraction=0 poisons "
                              "no sample; raise attack.poison_fraction")
        if self.strategy.name == "centralized":
            raise ConfigError(f"attack.kind={at.kind} poisons malicious clients' data, but "
                              "strategy.name=centralized pools all data in one client; use a "
                              "federated strategy (or local)")
        if self.data.format == "shapes" and self.data.generation_fraction >= 1.0 \
                and at.kind == "label_flip":
            raise ConfigError("attack.kind=label_flip flips understanding answers, but "
                              "data.generation_fraction=1 makes no understanding samples")
        if at.kind == "backdoor":
            if not at.target.strip() or not at.trigger.strip():
                raise ConfigError("attack.kind=backdoor needs a non-empty attack.target (an "
                                  "answer of the task) and attack.trigger (a prompt token)")
            if self.data.format == "shapes" and at.trigger_size > self.data.image_size:
                raise ConfigError(f"attack.trigger_size={at.trigger_size} is larger than the "
                                  f"images (data.image_size={self.data.image_size})")

    def _check_privacy(self) -> None:
        """Combinations differential privacy cannot serve (fedumm.fl.dp_sgd, fl.client_dp)."""
        self._check_sample_dp()
        self._check_client_dp()

    def _check_sample_dp(self) -> None:
        """Sample-level DP-SGD's refusals (fedumm.fl.dp_sgd)."""
        if not self.privacy.sample.enabled:
            return
        if self.train.answer_calibration:  # a change of the model outside the clipped sums
            raise ConfigError(
                f"train.answer_calibration={self.train.answer_calibration} calibrates the "
                "answer head by the client's own answer counts, which DP-SGD "
                "(privacy.sample.max_grad_norm) neither clips nor noises: the model would "
                "depend on the training samples outside the guarantee; leave "
                "train.answer_calibration unset under sample-level DP")

    def _check_client_dp(self) -> None:
        """Client-level DP's refusals (fedumm.fl.client_dp)."""
        dp, st = self.privacy.client, self.strategy
        if not dp.enabled:
            if dp.adaptive:
                raise ConfigError("privacy.client.adaptive=true needs privacy.client.clip, the "
                                  "initial clip norm (Andrew et al. suggest 0.1)")
            return
        off = "or leave privacy.client.clip unset"
        if st.name in BASELINE_MODES:
            raise ConfigError(f"privacy.client.clip is client-level DP over federated clients; "
                              f"the {st.name} baseline has none to protect: use a federated "
                              f"strategy.name (e.g. fedavg) {off}")
        if st.robust != "none":
            raise ConfigError(f"privacy.client.clip: client-level DP noises the clients' mean, "
                              f"which strategy.robust={st.robust} replaces (its sensitivity to "
                              f"one client is not bounded by the clip); set strategy.robust=none "
                              f"(the clip already bounds each client) {off}")
        folding = self.lora.folding
        if folding:
            raise ConfigError(f"privacy.client.clip: {folding} folds the clients' exact mean "
                              f"LoRA product, unclipped and unnoised, into the frozen weights; "
                              f"use lora.aggregation=separate or ffa {off}")
        if self.lora.client_ranks and self.lora.het_aggregation == "hetlora":
            raise ConfigError("privacy.client.clip: lora.het_aggregation=hetlora weighs clients "
                              "by their own ||B_k A_k||, an unbounded weight client-level DP "
                              f"cannot cover; use lora.het_aggregation=zeropad {off}")
        unprotected = {"fedexp": "its server step size reads each client's update norm",
                       "scaffold": "its control variates are averaged unclipped and unnoised",
                       "fedumm": "its quality weights are replaced by uniform weights under "
                                 "client-level DP (it would run as fedavg)"}
        if st.name in unprotected:
            raise ConfigError(f"privacy.client.clip with strategy.name={st.name}: "
                              f"{unprotected[st.name]}; use fedavg, fedprox, fedavgm, fedadam, "
                              f"fedyogi or fedadagrad {off}")
        if dp.side == "server" and self.secagg.enabled:
            raise ConfigError("privacy.client.side=server clips each client's update on the "
                              "server, which secure aggregation hides from it; use "
                              "privacy.client.side=client with secagg.enabled=true")
        if not dp.adaptive:
            return
        if dp.side == "client":
            raise ConfigError("privacy.client.adaptive=true is server-side only (the server "
                              "adapts the clip from the clients' updates); use "
                              "privacy.client.side=server or adaptive=false")
        m = (st.per_round(self.clients) if st.sampling == "uniform"
             else (st.poisson_rate or st.fraction) * self.clients)
        sigma_b = dp.count_noise if dp.count_noise is not None else m / 20
        z = dp.noise_multiplier
        if z > 0 and not z < 2 * sigma_b:
            default = " (unset: clients per round / 20 = " \
                      f"{m:g} / 20)" if dp.count_noise is None else ""
            raise ConfigError(f"privacy.client.adaptive=true: the clipped count's noise std "
                              f"{sigma_b:g}{default} must exceed privacy.client."
                              f"noise_multiplier / 2 = {z / 2:g} (Andrew et al.'s z_delta = "
                              f"(z^-2 - (2 sigma_b)^-2)^-1/2); set privacy.client.count_noise "
                              f"above {z / 2:g} or lower privacy.client.noise_multiplier")

    def _check_chain(self) -> None:
        """What chains of clients (fedumm.fl.chains) cannot serve: whatever needs each
        client's own update at the server, or one download for every client."""
        st = self.strategy
        # the baselines' clients are never chained: one config serves a run and its baselines
        if st.chain <= 1 or st.name in BASELINE_MODES:
            return
        off = "or set strategy.chain=1"
        why = {"scaffold": "keeps a control variate per client, which a chain's one update "
                           "does not have",
               "fedexp": "sizes its server step from the clients' own update norms"}
        if st.name in why:
            raise ConfigError(f"strategy.chain={st.chain} with strategy.name={st.name}: the "
                              f"strategy {why[st.name]}; {off}")
        for key, on in (("strategy.robust", st.robust != "none"),
                        ("secagg.enabled", self.secagg.enabled),
                        ("privacy.client.clip", self.privacy.client.clip is not None),
                        ("lora.client_ranks", bool(self.lora.client_ranks))):
            if on:
                raise ConfigError(f"strategy.chain={st.chain} with {key}: it works on each "
                                  f"client's own update (or rank), and a chain sends the server "
                                  f"one update for all its members; {off}")
        if not CODECS.resolve(self.codec.download).lossless:
            raise ConfigError(f"strategy.chain={st.chain} with codec.download="
                              f"{self.codec.download}: a lossy download sends changes to one "
                              f"copy every client holds, and chained clients hold different "
                              f"ones; use a lossless download codec, {off}")

    def _check_secagg(self) -> None:
        """Combinations secure aggregation cannot serve (fedumm.fl.secagg): the server sees
        only the sum of the round's weighted updates, so nothing may need one client's."""
        sa, st = self.secagg, self.strategy
        if not sa.enabled:
            return
        off = "or set secagg.enabled=false"
        if st.name in BASELINE_MODES:
            raise ConfigError(f"secagg.enabled with strategy.name={st.name}: this baseline "
                              f"aggregates nothing; use a federated strategy, {off}")
        each = {"fedumm": "weights each client by its own held-out quality",
                "scaffold": "averages each client's control-variate delta beside its update",
                "fedexp": "sizes its server step from each client's update norm"}
        if st.name in each:
            raise ConfigError(f"secagg.enabled with strategy.name={st.name}: the strategy "
                              f"{each[st.name]}, which the server never sees under secure "
                              f"aggregation; use fedavg, fedprox, fedavgm, fedadam, fedyogi or "
                              f"fedadagrad (the weighted mean and a server step), {off}")
        if st.robust != "none":
            raise ConfigError(f"secagg.enabled with strategy.robust={st.robust}: a robust "
                              f"rule needs each client's update, the server sees only their "
                              f"sum; set strategy.robust=none, {off}")
        if self.lora.folding or self.lora.client_ranks:
            what = self.lora.folding or "lora.client_ranks"
            raise ConfigError(f"secagg.enabled with {what}: it aggregates each client's own "
                              f"LoRA product or rank, the server sees only the sum of the "
                              f"factors; use lora.aggregation=separate (or ffa) without "
                              f"lora.client_ranks, {off}")
        if not CODECS.resolve(self.codec.upload).lossless:
            raise ConfigError(f"secagg.enabled with codec.upload={self.codec.upload}: the "
                              f"upload is a masked vector of 32-bit integers, uniformly "
                              f"random, which a lossy codec cannot compress (its error would "
                              f"land on the mask); set codec.upload=float32, {off}")
        if sa.method == "he":
            self._check_he()
            return
        if sa.threshold > 1 and sa.threshold != int(sa.threshold):
            raise ConfigError(f"secagg.threshold={sa.threshold}: expected a fraction <= 1 or "
                              f"a whole number of clients")
        n = st.per_round(self.clients)  # the clients a uniform round sums
        holders, t = sa.share_holders(n), sa.threshold_count(n)
        if t > holders:
            raise ConfigError(f"secagg.threshold={sa.threshold} asks for {t} shares to rebuild "
                              f"a client's mask, but each client shares among {holders} "
                              f"clients (a round has {n}, clients={self.clients}, "
                              f"secagg.neighbours={sa.neighbours}); lower secagg.threshold "
                              f"to at most {holders} or take more clients per round")
        if sa.quantization_range % 2:  # 0 must map to an integer, R / 2
            raise ConfigError(f"secagg.quantization_range={sa.quantization_range}: expected "
                              f"an even number (a zero update maps to half of it exactly)")
        if n * sa.quantization_range >= 2**32:
            raise ConfigError(f"secagg.quantization_range={sa.quantization_range}: the sum "
                              f"of {n} clients' quantised updates must fit in 32 bits "
                              f"(clients per round * range < 2^32); lower it to at most "
                              f"{(2**32 - 1) // n} or take fewer clients per round")

    def _check_he(self) -> None:
        """secagg.method=he needs FLARE's sites (fedumm.fl.he_sum)."""
        if self.runtime == "local":
            raise ConfigError("secagg.method=he: homomorphic encryption needs sites that hold "
                              "the secret key apart from the server, which the local runtime "
                              "does not have; use runtime=flare-sim or runtime=flare-poc, or "
                              "secagg.method=secagg+")

    def _check_faults(self) -> None:
        """Combinations the simulated faults cannot serve (fedumm.runtime.faults)."""
        f = self.faults
        if f.dropout >= 1.0:
            raise ConfigError("faults.dropout=1 drops every client out of every round: nothing "
                              "would train; use a probability below 1")
        if (f.straggler_fraction > 0) != (f.straggler_delay_s > 0):
            raise ConfigError(f"faults.straggler_fraction={f.straggler_fraction} with "
                              f"faults.straggler_delay_s={f.straggler_delay_s} slows no client; "
                              "set both (a fraction of slow clients and their delay) or neither")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- validation

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
# A config holds a few hundred values; YAML aliases can make a small file expand far beyond
# that (each level of `b: [*a, *a, ...]` multiplies), so loading stops past these
MAX_NODES = 100_000
MAX_DEPTH = 32


def _name(key: str) -> str:
    """A key as written when it is plain text, else its repr (a newline stays one line)."""
    return key if key.isprintable() and len(key) <= 120 else _show(key)


def _show(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to one short line for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# YAML 1.2 numbers that YAML 1.1 (PyYAML) reads as strings: 1e-3, 2E5, -1.5e+2
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _check_scalar(key: str, value: Any, tp: type, meta: dict) -> Any:
    if tp is float and isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {_TYPE_NAMES[tp]}, got {_show(value)}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected one of {list(meta['choices'])}, got {_show(value)}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{key}: expected a value {op} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: expected a value <= {hi}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got "
                          f"{_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {_name(prefix + unknown[0])}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        key, tp, meta = prefix + name, hints[name], dict(fields[name].metadata)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
        elif typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp)
            if isinstance(value, str):  # `lora.groups=vision,language` on the command line
                value = [v.strip() for v in value.split(",") if v.strip()]
                if item_tp is int:
                    value = [int(v) if v.lstrip("-").isdigit() else v for v in value]
            if not isinstance(value, list):
                raise ConfigError(f"{key}: expected a list, got {_show(value)}")
            kwargs[name] = [_check_scalar(f"{key}[{i}]", v, item_tp, meta)
                            for i, v in enumerate(value)]
        elif isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            kwargs[name] = None if value is None else _check_scalar(key, value, args[0], meta)
        else:
            kwargs[name] = _check_scalar(key, value, tp, meta)
    obj = cls(**kwargs)
    post = getattr(obj, "validate", None)
    if callable(post):
        post()
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"partition.alpha=0.1"`` -> (["partition", "alpha"], 0.1); values parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. partition.alpha=0.1")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {_show(text)}: empty key component")
    if not raw.strip():
        return parts, ""
    value = _load_yaml(raw, f"override {_show(text)}: the value of {key.strip()}")
    check_tree(value, f"override {_show(text)}", key.strip())
    return parts, value


def _expand_shorthands(raw: dict[str, Any]) -> None:
    """``codec: X`` (one spelling) means the same codec in both directions."""
    if isinstance(raw.get("codec"), str):
        raw["codec"] = {"upload": raw["codec"], "download": raw["codec"]}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); validation happens afterwards."""
    out = _deepcopy(raw)
    _expand_shorthands(out)
    for text in overrides:
        parts, value = parse_override(text)
        if parts == ["codec"] and not isinstance(value, dict):
            value = str(value)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
        node[parts[-1]] = value
        _expand_shorthands(out)
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Validate a nested dict (plus overrides) into a :class:`Config`."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {_show(raw)}")
    check_tree(raw, "config")
    return _build(Config, apply_overrides(raw, overrides or []))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML config file (not yet validated)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from exc
    raw = _load_yaml(text, str(p)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    check_tree(raw, str(p))
    return raw


def _load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with every failure a ConfigError naming ``where`` (deep nesting
    makes PyYAML's composer recurse past Python's limit)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML ({at}{problem[:200]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None


def check_tree(node: Any, where: str, prefix: str = "") -> None:
    """A loaded YAML value is something a config can hold: no alias cycle (``a: &x [*x]``),
    keys that are names (YAML allows ``1: x``), at most :data:`MAX_DEPTH` levels and
    :data:`MAX_NODES` values with aliases expanded. Errors name ``where`` and the key."""
    budget = [MAX_NODES]
    _check_node(node, where, prefix, [], budget)


def _check_node(node: Any, where: str, key: str, ancestors: list[int], budget: list[int]
                ) -> None:
    if not isinstance(node, (dict, list)):
        return
    here = _name(key) if key else "the top level"
    if id(node) in ancestors:
        raise ConfigError(f"{where}: {here} refers to a value that holds it (a YAML alias "
                          "cycle)")
    if len(ancestors) >= MAX_DEPTH:
        raise ConfigError(f"{where}: {here} is nested more than {MAX_DEPTH} levels deep")
    budget[0] -= len(node)
    if budget[0] < 0:
        raise ConfigError(f"{where}: more than {MAX_NODES} values once YAML aliases are "
                          f"expanded (at {here}); a config is far smaller")
    ancestors.append(id(node))
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: key {key + '.' if key else ''}{_show(k)} is not "
                                  f"a name (a {type(k).__name__}); config keys are words")
            _check_node(v, where, f"{key}.{k}" if key else k, ancestors, budget)
    else:
        for i, v in enumerate(node):
            _check_node(v, where, f"{key}[{i}]", ancestors, budget)
    ancestors.pop()


def _check_reader_packages(key: str, modality: str, spec: str) -> None:
    """The data files ``spec`` names can be read with what is installed: the file format
    each is detected as may need an optional package (a Hugging Face dataset: ``datasets``).
    Paths that do not exist are left to the readers, which name them."""
    if not spec:
        return
    paths = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
    for path in (Path(p) for p in paths):
        name, reader = _detected_reader(modality, path)
        for module, install in getattr(reader, "requires", ()):
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"{key}: {path} is read as {name} data, which needs the "
                                  f"optional package '{module}' ({install})")


def _detected_reader(modality: str, path: Path) -> tuple[str, Any]:
    """(name, reader) of the file format that reads ``path``, asking the formats in their
    detection order only as far as the last one that needs an optional package (detecting
    can read a file, so the others are left to reading)."""
    formats = sorted((getattr(r, "order", 50), n, r) for n in READERS.names()
                     if (r := READERS.get(n)).detect is not None and modality in r.modalities)
    needy = [i for i, (_, _, r) in enumerate(formats) if getattr(r, "requires", ())]
    if not path.exists() or not needy:
        return "", None
    for _, name, reader in formats[: needy[-1] + 1]:
        try:
            if reader.detect(path):
                return name, reader
        except (OSError, ValueError):  # unreadable: reading it says why, naming the file
            return "", None
    return "", None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides."""
    return config_from_dict(read_yaml(path) if path is not None else {}, overrides)
