"""The GRPO config schema with defaults, the stage schedule, and the start-up checks.

Every configs/*grpo*.py / polaris_*.py starts from `default_config()`, so `--config.key=value` means
the same thing in every RL experiment and a key that exists nowhere is refused.

The stage schedule (Polaris, An et al. 2025) is four parallel lists, one entry per stage:
    schedule.max_response_len = (39936, 48128, 52224)
    schedule.temperature      = (1.4, 1.45, 1.5)
    schedule.steps            = (700, 300, 200)
    schedule.datasets         = ("polaris_53k.jsonl", "stage2.jsonl", "stage3.jsonl")
`validate_config` refuses, before anything is built, a schedule whose lists disagree in length,
whose lengths decrease, or whose datasets do not exist, any algorithm name no registry knows, and
any `algo.advantage_kwargs` / `algo.policy_loss_kwargs` its estimator's or loss's signature does not
take (or that leave out one it needs).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from polaris_jax.data.benchmarks import R1_MATH_INSTRUCTION, benchmark_names
from polaris_jax.models.config import ConfigError
from polaris_jax.models.sharding import DEFAULT_RULES
from polaris_jax.sampling.engine_settings import check_sampler_config, engine_section
from polaris_jax.train import rl, setup
from polaris_jax.train.grpo.rollout_mesh import check_rollout_section
from polaris_jax.train.optimizer import check_master_weights


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "grpo"
    c.seed = 0

    setup.add_model_sections(c)  # model.init_from is the policy's start and the reference

    c.tokenizer_dir = ""  # "" = model.init_from; "synthetic_arith" = the arithmetic task's tokenizer

    # Problem files: any layout data.load_benchmark reads (its loaders find the problem and answer fields).
    c.data = ml_collections.ConfigDict()
    c.data.instruction = R1_MATH_INSTRUCTION  # appended to the problem on its own line ("" = none)
    c.data.template_kwargs = ml_collections.ConfigDict()
    c.data.max_prompt_len = 1024  # prompts are left-padded to this; longer ones are skipped
    c.data.shuffle = True

    c.schedule = ml_collections.ConfigDict()
    c.schedule.max_response_len = (1024,)
    c.schedule.temperature = (1.0,)
    c.schedule.steps = (100,)
    c.schedule.datasets = ("",)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_step = 128
    c.rollout.samples_per_prompt = 8
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.chunks = 1  # rollouts in this many pieces; piece i is scored while piece i+1 samples
    c.rollout.backend = "engine"  # engine (continuous batching, paged KV) | static (sampling.generate)
    c.rollout.engine = engine_section()  # the engine's sizes
    # k >= 1: the batch of step t is sampled (in a background thread) by weights at most k updates old,
    # while the learner updates; 0: synchronous. See train/grpo/rollout_ahead.py and streaming.py.
    c.rollout.max_staleness = 0
    # Engine, k >= 1: prompts admitted at once (follows prompts_per_step until set), and how many weight
    # versions one response may span (1: none carried across an update; > 1: partial rollouts).
    c.rollout.max_prompts_in_flight = c.rollout.get_ref("prompts_per_step") * 1
    c.rollout.max_steps_per_response = 1
    c.rollout.mesh = ml_collections.ConfigDict()  # the engine's axis sizes; empty: the training mesh
    c.rollout.devices = "shared"  # shared | disjoint (the engine on the last prod(rollout.mesh) devices)
    # Benchmarks only: > 0 ignores EOS and gives each prompt a seeded lognormal response budget whose 99th
    # percentile (max_response_len) is this many times its 1st (rollout.long_tail_budgets).
    c.rollout.length_spread = 0.0
    # MoE router replay: the engine records each token's experts and the update routes through them (the
    # training/inference routing mismatch fix); the engine backend, padded updates, no rollout rescue.
    c.rollout.router_replay = False

    c.algo = ml_collections.ConfigDict()
    c.algo.advantage = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp_baseline
    c.algo.advantage_kwargs = ml_collections.ConfigDict()  # the estimator's own knobs, e.g. epsilon=1e-6
    c.algo.policy_loss = "ppo_clip"  # ppo_clip | gspo | cispo
    c.algo.policy_loss_kwargs = ml_collections.ConfigDict()  # the loss's own knobs, e.g. clip_ratio_c=3.0 (dual-clip)
    # The clip range, passed to every policy loss whose signature names it (its only default).
    c.algo.clip_low = 0.2
    c.algo.clip_high = 0.28  # DAPO clip-higher
    c.algo.loss_agg_mode = "token-mean"
    c.algo.kl_coef = 0.0
    c.algo.kl_type = "k3"
    c.algo.use_reference = False  # keep frozen reference params (needed for kl_coef > 0; logs kl_to_ref)
    c.algo.entropy_coef = 0.0
    c.algo.num_iterations = 1  # mu: updates per rollout batch
    c.algo.minibatches = 1  # optimizer steps per iteration
    c.algo.microbatches = 1  # gradient accumulation inside a minibatch
    # > 0: the update packs (prompt + response) sequences into rows of this many tokens (train/grpo/packing.py);
    # it must hold the longest sequence, data.max_prompt_len + the longest stage's max_response_len.
    c.algo.pack_tokens = 0
    # Packed updates: tokens per micro pass and batch shard (verl's ppo_max_token_len_per_gpu), a multiple of
    # pack_tokens; the micro-pass count then follows each batch's packed rows (0 = algo.microbatches).
    c.algo.micro_tokens = 0
    c.algo.off_policy = "none"  # none | tis | mis | decoupled: the correction against the sampler's logprobs
    c.algo.off_policy_cap = 2.0  # C of tis / mis

    c.shaping = ml_collections.ConfigDict()
    c.shaping.dynamic_sampling = False  # DAPO: refill with fresh prompts until all groups are informative
    c.shaping.dynamic_sampling_max_rounds = 8
    c.shaping.polaris_substitution = False  # Polaris: overwrite uninformative groups, skip if <= 1/3 informative
    c.shaping.min_informative_fraction = 1.0 / 3.0
    c.shaping.overlong_filter = False  # DAPO: truncated responses get no loss
    c.shaping.rollout_rescue = False  # Polaris: swap a stored correct answer into all-wrong groups
    c.shaping.rescue_max_prompts = 100_000

    # polaris_jax.rewards spec: {name: {weight, **params}}; "accuracy" is the verifier's verdict.
    c.rewards = ml_collections.ConfigDict({"accuracy": {"weight": 1.0}})
    c.reward_workers = 0  # verifier processes; 0 = one per CPU
    c.reward_timeout_s = 5.0
    c.verifier = ml_collections.ConfigDict(dict(think_policy="auto"))  # auto | strip | require | ignore

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.peak_lr = 1e-6
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.min_lr_ratio = 1.0  # constant lr, as in verl's GRPO recipes
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0
    # bf16 params (model.param_dtype) with a float32 master copy in the optimiser state (train.optimizer).
    c.optimizer.master_weights = False
    # The optimiser state waits in pinned host memory while the engine decodes (synchronous loop only).
    c.optimizer.offload_during_rollout = False

    c.train = ml_collections.ConfigDict()
    c.train.loss_chunk_size = 512
    c.train.log_every = 1
    c.train.log_distinct_4 = True  # Polaris's diversity metric over each step's groups

    c.eval = ml_collections.ConfigDict()
    c.eval.dataset = ""  # held-out jsonl / parquet; "" = no evaluation
    c.eval.every = 0  # steps; 0 = only before and after training
    c.eval.num_problems = 0  # 0 = all
    c.eval.samples_per_problem = 4  # pass@1 = mean correctness over these samples (avg@n)
    c.eval.temperature = -1.0  # < 0 = the first stage's temperature
    c.eval.max_response_len = 0  # 0 = the last stage's

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.lora_only = False

    c.export = ml_collections.ConfigDict()
    c.export.hf = True
    c.plots = True  # training curves PNG at the end

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding_rules = tuple(DEFAULT_RULES)
    return c


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    first_step: int  # global step at which the stage starts (0-based)
    steps: int
    max_response_len: int
    temperature: float
    dataset: str


def stages(config) -> list[Stage]:
    s = config.schedule
    out, first = [], 0
    for i, (length, temperature, steps, dataset) in enumerate(
        zip(s.max_response_len, s.temperature, s.steps, s.datasets)
    ):
        out.append(Stage(i, first, int(steps), int(length), float(temperature), str(dataset)))
        first += int(steps)
    return out


def total_steps(config) -> int:
    return sum(int(x) for x in config.schedule.steps)


def stage_at(stage_list: list[Stage], step: int) -> Stage:
    """The stage that global step `step` (0-based) belongs to."""
    for stage in stage_list:
        if step < stage.first_step + stage.steps:
            return stage
    return stage_list[-1]


def _dataset_exists(path: str) -> bool:
    """A file or directory, a remote or tfds or synthetic spec, or the name of a shipped benchmark."""
    if not path:
        return False
    return os.path.exists(path) or path.startswith(("gs://", "tfds:", "synthetic_arith:")) or path in benchmark_names()


# Algo keys passed to every policy loss whose signature names them.
CLIP_KEYS = ("clip_low", "clip_high")


def _frozen(value, where: str):
    value = tuple(value) if isinstance(value, list) else value
    try:
        hash(value)
    except TypeError:
        raise ConfigError(f"{where} is a {type(value).__name__}; it must be a number, string, bool or tuple") from None
    return value


def policy_loss_kwargs(config) -> tuple[tuple[str, object], ...]:
    """The policy loss's keyword arguments as sorted (name, value) pairs (hashable, for the jitted update):
    `algo.clip_low` / `algo.clip_high` where its signature takes them, and `algo.policy_loss_kwargs`."""
    a = config.algo
    own = dict(a.policy_loss_kwargs)
    for key in CLIP_KEYS:
        if key in own:
            raise ConfigError(f"algo.policy_loss_kwargs.{key}: set algo.{key} instead")
    knobs = rl.POLICY_LOSSES.knobs(a.policy_loss)
    kwargs = {**{key: a[key] for key in CLIP_KEYS if key in knobs}, **own}
    return tuple(sorted((k, _frozen(v, f"algo.policy_loss_kwargs.{k}")) for k, v in kwargs.items()))


def validate_config(config, *, check_files: bool = True, device_count: int | None = None) -> None:
    """Refuses, with a message naming the field, a config the loop could only fail on later. `device_count`:
    the devices to check the meshes against (default: this process's)."""
    # Here, not at the top: `polaris_jax.rewards` imports sympy, which loading a config does not need.
    from polaris_jax.rewards import validate_spec
    from polaris_jax.rewards.extraction import THINK_POLICY_CHOICES

    s = config.schedule
    lists = {
        "max_response_len": s.max_response_len,
        "temperature": s.temperature,
        "steps": s.steps,
        "datasets": s.datasets,
    }
    lengths = {k: len(v) for k, v in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"schedule lists must have one entry per stage, got lengths {lengths}")
    if lengths["steps"] == 0:
        raise ConfigError("schedule has no stage")
    for i, stage in enumerate(stages(config)):
        where = f"schedule stage {i}"
        if stage.steps < 1:
            raise ConfigError(f"{where}: steps={stage.steps} must be >= 1")
        if stage.max_response_len < 1:
            raise ConfigError(f"{where}: max_response_len={stage.max_response_len} must be >= 1")
        if not stage.temperature > 0:
            raise ConfigError(f"{where}: temperature={stage.temperature} must be > 0")
        if i and stage.max_response_len < s.max_response_len[i - 1]:
            raise ConfigError(
                f"{where}: max_response_len {stage.max_response_len} is shorter than stage "
                f"{i - 1}'s {s.max_response_len[i - 1]}; Polaris stages only lengthen responses"
            )
        if not stage.dataset:
            raise ConfigError(f"{where}: no dataset")
        if check_files and not _dataset_exists(stage.dataset):
            raise ConfigError(f"{where}: dataset {stage.dataset!r} does not exist")
    if check_files and config.eval.dataset and not _dataset_exists(config.eval.dataset):
        raise ConfigError(f"eval.dataset {config.eval.dataset!r} does not exist")

    a, r = config.algo, config.rollout
    for table, name in (
        (rl.ADVANTAGES, a.advantage),
        (rl.POLICY_LOSSES, a.policy_loss),
        (rl.LOSS_AGGREGATIONS, a.loss_agg_mode),
        (rl.KL_ESTIMATORS, a.kl_type),
    ):
        if name not in table:
            raise ConfigError(f"unknown {table.kind} {name!r}; available: {', '.join(table.names())}")
    if r.prompts_per_step < 1 or r.samples_per_prompt < 1:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} and samples_per_prompt={r.samples_per_prompt} must be >= 1"
        )
    try:
        rl.ADVANTAGES.bind(a.advantage, a.advantage_kwargs)
    except ValueError as e:
        raise ConfigError(f"algo.advantage_kwargs: {e}") from None
    loss_kwargs = dict(policy_loss_kwargs(config))
    try:
        rl.POLICY_LOSSES.bind(a.policy_loss, loss_kwargs)
    except ValueError as e:
        raise ConfigError(f"algo.policy_loss_kwargs: {e}") from None
    if r.samples_per_prompt < rl.min_group_size(a.advantage):
        raise ConfigError(
            f"algo.advantage={a.advantage!r} needs rollout.samples_per_prompt >= "
            f"{rl.min_group_size(a.advantage)}, got {r.samples_per_prompt}"
        )
    rows = r.prompts_per_step * r.samples_per_prompt
    if a.minibatches < 1 or rows % a.minibatches:
        raise ConfigError(f"{rows} responses per step do not split into algo.minibatches={a.minibatches}")
    if a.microbatches < 1 or (rows // a.minibatches) % a.microbatches:
        raise ConfigError(
            f"a minibatch of {rows // a.minibatches} rows does not split into algo.microbatches={a.microbatches}"
        )
    if a.microbatches > 1 and rl.micro_weight(a.loss_agg_mode) is None:
        raise ConfigError(
            f"algo.loss_agg_mode={a.loss_agg_mode!r} declares no microbatch weighting, so "
            f"algo.microbatches={a.microbatches} must be 1"
        )
    longest = config.data.max_prompt_len + max(config.schedule.max_response_len)
    if a.pack_tokens and a.pack_tokens < longest:
        raise ConfigError(
            f"algo.pack_tokens={a.pack_tokens} must be 0 (no packing) or hold the longest sequence, {longest} tokens "
            f"(data.max_prompt_len + the longest stage's max_response_len)"
        )
    if a.micro_tokens and not (a.pack_tokens and a.micro_tokens % a.pack_tokens == 0 and a.microbatches == 1):
        raise ConfigError(
            f"algo.micro_tokens={a.micro_tokens} sets the micro passes of packed updates: it needs "
            f"algo.pack_tokens > 0 (now {a.pack_tokens}) dividing it, and algo.microbatches = 1 (now {a.microbatches})"
        )
    if config.rollout.router_replay and (config.rollout.backend != "engine" or config.shaping.rollout_rescue):
        raise ConfigError(
            "rollout.router_replay records experts in the paged engine: it needs rollout.backend='engine' "
            f"(now {config.rollout.backend!r}) and shaping.rollout_rescue=False (now {config.shaping.rollout_rescue})"
        )
    if a.micro_tokens and rl.micro_weight(a.loss_agg_mode) is None:
        raise ConfigError(
            f"algo.loss_agg_mode={a.loss_agg_mode!r} declares no microbatch weighting for algo.micro_tokens"
        )
    if a.num_iterations < 1:
        raise ConfigError(f"algo.num_iterations={a.num_iterations} must be >= 1")
    if a.kl_coef and not a.use_reference:
        raise ConfigError(f"algo.kl_coef={a.kl_coef} needs algo.use_reference=True")
    if a.off_policy not in rl.OFF_POLICY_NAMES:
        raise ConfigError(f"algo.off_policy={a.off_policy!r} is not one of {rl.OFF_POLICY_NAMES}")
    if not a.off_policy_cap > 0:
        raise ConfigError(f"algo.off_policy_cap={a.off_policy_cap} must be > 0")
    staleness = r.max_staleness
    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise ConfigError(f"rollout.max_staleness={staleness!r} must be an integer >= 0 (0: synchronous)")
    if config.optimizer.offload_during_rollout and staleness:
        raise ConfigError(
            f"optimizer.offload_during_rollout=True needs the synchronous loop (rollout.max_staleness=0, now "
            f"{staleness}): with rollouts ahead the update runs while the engine decodes"
        )
    check_master_weights(config.optimizer, config.model.param_dtype)
    if r.chunks < 1 or r.prompts_per_step % r.chunks:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} does not split into rollout.chunks={r.chunks}"
        )
    try:
        check_sampler_config(r.backend, r.engine, "rollout.")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_rollout_section(config, device_count)
    if config.shaping.dynamic_sampling and config.shaping.polaris_substitution:
        raise ConfigError("choose one of shaping.dynamic_sampling (DAPO) and shaping.polaris_substitution")
    try:
        validate_spec(config.rewards)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"rewards: {e}") from None
    if config.verifier.think_policy not in THINK_POLICY_CHOICES:
        raise ConfigError(
            f"verifier.think_policy={config.verifier.think_policy!r} is not one of {THINK_POLICY_CHOICES}"
        )
    if config.data.max_prompt_len < 1:
        raise ConfigError(f"data.max_prompt_len={config.data.max_prompt_len} must be >= 1")
