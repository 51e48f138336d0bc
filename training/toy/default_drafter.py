"""The embedded default drafter: an LK-trained head for a target, built on first use and cached.

`make serve` / `vllm-lk serve` without --drafter serve the toy target with this head. Building it
is the whole pipeline a user would run by hand: regenerate training data with the target in vLLM
(`vllm-lk generate` on built-in code and docstring prompts from the corpus's training split),
then `vllm-lk train` with LK-hybrid. Both steps resume, so an interrupted first use continues
where it stopped. The cache key is the target's identity plus this config's digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pydantic import Field

from training.config import FrozenConfig
from training.train_config import DrafterKind, TrainConfig

logger = logging.getLogger(__name__)


# Why the MLP speculator, served at K = 4 with fixed speculation: on the embedded toy target it had
# the best measured speedup of the four drafters at T=0 and T=1 (`vllm-lk bench speed`,
# docs/speed.md), and with this recipe K = 4 was its best fixed K at concurrency 1 at both
# temperatures. It is trained with 5 stages (the bench's build, so the bench measures what
# `make serve` serves) and served with the first 4.
SERVED_K = 4


class DefaultDrafterConfig(FrozenConfig):
    drafter: DrafterKind = Field("mlp", description="draft architecture of the default head")
    loss: str = Field("lk-hybrid", description="training loss")
    num_heads: int = Field(5, description="K trained: heads / stages / TTT steps")
    code_prompts: int = Field(640, description="built-in code-continuation prompts (corpus train split)")
    docstring_prompts: int = Field(192, description="built-in docstring -> function chat prompts (corpus train split)")
    max_tokens: int = Field(128, description="tokens the target generates per prompt")
    temperature: float = Field(1.0, description="sampling temperature of the regenerated responses")
    steps: int = Field(600, description="optimizer steps")
    batch_size: int = Field(8, description="sequences per step")
    lr: float = Field(3e-3, description="peak learning rate")
    seed: int = Field(0, description="seed for generation and training")

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            drafter=self.drafter, loss=self.loss, num_heads=self.num_heads, steps=self.steps,
            batch_size=self.batch_size, lr=self.lr, seed=self.seed, checkpoint_every=100, log_every=20,
        )


def _target_identity(target_dir: Path) -> str:
    """The toy target's config digest, or a hash of an arbitrary target's config + weights."""
    toy = target_dir / "toy_target.json"
    if toy.is_file():
        return json.loads(toy.read_text())["config_digest"]
    digest = hashlib.sha256()
    for path in sorted(target_dir.glob("*.safetensors")) + [target_dir / "config.json"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _data_fields(config: DefaultDrafterConfig) -> dict:
    return config.model_dump(include={"code_prompts", "docstring_prompts", "max_tokens", "temperature", "seed"})


def default_data_dir(target_dir: Path, config: DefaultDrafterConfig) -> Path:
    """Where the regenerated training data lives: keyed by the target and the data fields only,
    so drafters of every kind (`vllm-lk bench speed` builds several) train on one generation."""
    from training.toy.target import default_cache_dir

    fields = json.dumps(_data_fields(config), sort_keys=True)
    key = hashlib.sha256(f"{_target_identity(target_dir)}:{fields}".encode()).hexdigest()[:12]
    return default_cache_dir() / f"drafter-data-{key}"


def default_drafter_dir(target_dir: Path, config: DefaultDrafterConfig) -> Path:
    from training.toy.target import default_cache_dir

    key = hashlib.sha256(f"{_target_identity(target_dir)}:{config.digest()}".encode()).hexdigest()[:12]
    return default_cache_dir() / f"drafter-{config.drafter}-{key}"


def ensure_default_data(target: Path, config: DefaultDrafterConfig) -> Path:
    """The regenerated conversations (JSONL) for ``target``, generating what is missing."""
    from training.generate import GenerateConfig, generate, make_llm

    work = default_data_dir(target, config)
    data = work / "train.jsonl"
    if data.is_file():
        return data
    logger.info("default drafter: regenerating training data with the target in %s", work)
    work.mkdir(parents=True, exist_ok=True)
    sets = {kind: count for kind, count in (("code", config.code_prompts), ("docstring", config.docstring_prompts)) if count}
    gen = GenerateConfig(target=target, prompts="builtin:code:train:1", max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed)
    llm = make_llm(target, gen, seed=config.seed)
    try:
        for kind, count in sets.items():
            spec = gen.model_copy(update={"prompts": f"builtin:{kind}:train:{count}:{config.seed}"})
            generate(spec, work / f"{kind}.jsonl", llm=llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
    partial = work / "train.jsonl.partial"
    partial.write_text("".join((work / f"{kind}.jsonl").read_text() for kind in sets))
    partial.replace(data)
    return data


def cached_default_drafter(target_dir: Path, config: DefaultDrafterConfig | None = None) -> Path | None:
    """The finished default drafter for ``target_dir`` if the cache holds one, else None."""
    drafter_dir = default_drafter_dir(Path(target_dir), config or DefaultDrafterConfig()) / "run" / "drafter"
    return drafter_dir if (drafter_dir / "lk_metadata.json").is_file() else None


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            continue  # a line being written
    return 0


def build_progress(target_dir: Path, config: DefaultDrafterConfig | None = None) -> dict:
    """How far a build of the default drafter is, read from its files (so any process can ask):
    ``{"stage": "data"|"training"|"done", "done", "total", "fraction"}``, fraction over the whole
    build (data ~ 20 %, training the rest: the measured split of a first `make serve`)."""
    config = config or DefaultDrafterConfig()
    target_dir = Path(target_dir)
    if cached_default_drafter(target_dir, config) is not None:
        return {"stage": "done", "done": config.steps, "total": config.steps, "fraction": 1.0}
    data = default_data_dir(target_dir, config)
    if not (data / "train.jsonl").is_file():
        total = config.code_prompts + config.docstring_prompts
        done = min(total, _lines(data / "code.jsonl") + _lines(data / "docstring.jsonl"))
        return {"stage": "data", "done": done, "total": total, "fraction": round(0.2 * done / total, 4)}
    step = min(config.steps, _last_step(default_drafter_dir(target_dir, config) / "run" / "metrics.jsonl"))
    return {"stage": "training", "done": step, "total": config.steps, "fraction": round(0.2 + 0.8 * step / config.steps, 4)}


def ensure_default_drafter(target_dir: str | Path | None = None, config: DefaultDrafterConfig | None = None) -> Path:
    """Directory of the default drafter for ``target_dir`` (default: the toy target), building it
    (generate, then train) if the cache does not hold a finished one."""
    from training.generate import resolve_target
    from training.trainer import train

    config = config or DefaultDrafterConfig()
    target = resolve_target(Path(target_dir) if target_dir is not None else None)
    work = default_drafter_dir(target, config)
    drafter_dir = work / "run" / "drafter"
    if (drafter_dir / "lk_metadata.json").is_file():
        logger.info("default drafter: cached at %s", drafter_dir)
        return drafter_dir
    data = ensure_default_data(target, config)
    logger.info("default drafter: training %s with %s in %s", config.drafter, config.loss, work)
    run_dir = work / "run"
    train(config.train_config(), target, data, run_dir, resume=(run_dir / "checkpoints").is_dir())
    return drafter_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m training.toy.default_drafter --target DIR [--config JSON]``: build (or find) the
    default drafter and print its directory; what the server runs in the background (a process
    of its own, so training never competes with the server's event loop)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.toy.default_drafter")
    parser.add_argument("--target", type=Path, required=True, help="target directory")
    parser.add_argument("--config", default=None, help="DefaultDrafterConfig fields as JSON (default: the defaults)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = DefaultDrafterConfig(**json.loads(args.config)) if args.config else DefaultDrafterConfig()
    print(ensure_default_drafter(args.target, config), flush=True)
    return 0


if __name__ == "__main__":
    main()
