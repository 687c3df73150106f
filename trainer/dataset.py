"""The score-conditioned offline set: each scored episode becomes one chat example whose system
prompt carries the label of the score it actually earned (good and bad episodes alike).

Choices, so they are written down once:
- Parse failures are kept, with the score the reward module gave them (0 when it wrote no reward
  row): the model sees its own malformed output under a low label, which is what reward
  conditioning is for.
- Held-out items are not carved out of train blocks: they live in the gate and eval regions of
  the timeline (market.split), embargoed from the train region, where the runner never plans a
  train item; `eval` and `gate` blocks are never trained on. Every train block is trainable.
- Quantile labels use edges over every scored episode of the offline set.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from rewards.config import RewardsConfig
from rewards.labels import quantile_edges, rank_label, training_label
from store.db import session_scope
from store.training import ScoredEpisode, episode_messages, scored_episodes, train_block_ids, used_block_ids
from trainer.config import TrainerConfig
from trainer.decision import TOOL_CALL, leave_decision_out
from trainer.errors import TrainerError


@dataclass(frozen=True)
class Example:
    """One training example: the episode's messages with the achieved score's label, plus its ids."""

    episode_id: int
    block_id: int
    prediction_id: int
    score: float
    label: str
    messages: list[dict[str, str]]

    def record(self) -> dict:
        return asdict(self)


@dataclass
class RoundPlan:
    """What one round trains on: the new blocks' episodes plus a fixed-size replay sample."""

    new_block_ids: list[int]
    new: list[ScoredEpisode]
    replay: list[ScoredEpisode]
    edges: list[float] | None = None
    offline_size: int = 0
    # label_format "rank": episode id -> (how many of its item's episodes earned less, the item's episodes)
    ranks: dict[int, tuple[int, int]] | None = None
    # the new blocks' scored episodes before filter_top_fraction: what min_new_episodes counts, so a filtered
    # round starts after one block as an unfiltered one does (not after 1 / fraction blocks)
    scored_new: int = 0

    @property
    def episodes(self) -> list[ScoredEpisode]:
        return self.new + self.replay


def offline_set(session: Session, cfg: TrainerConfig) -> list[ScoredEpisode]:
    """Every trainable scored episode: those of complete `train` blocks."""
    trainable = set(train_block_ids(session))
    return [e for e in scored_episodes(session) if e.block_id in trainable and e.block_kind == "train"]


def achieved_score(ep: ScoredEpisode) -> float:
    return 0.0 if ep.score is None else ep.score


def label_edges(episodes: Sequence[ScoredEpisode], rewards_cfg: RewardsConfig) -> list[float] | None:
    if rewards_cfg.label_format != "quantile":
        return None
    return quantile_edges([achieved_score(e) for e in episodes], rewards_cfg.quantile_bins)


def item_ranks(episodes: Sequence[ScoredEpisode]) -> dict[int, tuple[int, int]]:
    """Episode id -> (how many episodes of the same item in the same block earned strictly less, how many
    episodes that item has there): the group each `Rank:` label is relative to."""
    groups: dict[tuple, list[ScoredEpisode]] = {}
    for e in episodes:
        groups.setdefault((e.block_id, e.ticker, e.as_of), []).append(e)
    return {e.episode_id: (sum(achieved_score(g) < achieved_score(e) for g in group), len(group))
            for group in groups.values() for e in group}


def relabel(messages: list[dict[str, str]], conditioning: str | None, label: str, episode_id: int) -> list[dict]:
    """Swap the inference-time target label for the achieved one in every prompt turn that carries it (the
    task turn and the turns after tool results, `agent.label_each_turn`; the system prompt in traces
    written before the label moved there)."""
    if not conditioning:
        raise TrainerError(f"episode {episode_id} has no conditioning label stored (episodes.conditioning), "
                           "so its target cannot be swapped for the achieved score; re-run or delete that block")
    out = [dict(m) for m in messages]
    found = False
    for msg in out:
        if msg["role"] in ("system", "user") and conditioning in msg["content"]:
            msg["content"] = msg["content"].replace(conditioning, label)
            found = True
    if not found:
        raise TrainerError(f"episode {episode_id}: its conditioning label {conditioning!r} is not in its prompt, "
                           "so the achieved-score label cannot be written; the trace is inconsistent")
    return out


def trains_decision(ep: ScoredEpisode, decision_from: str) -> bool:
    """Whether this episode's direction and confidence carry loss under `trainer.decision_from`."""
    return decision_from == "all" or bool(ep.correct)


def build_examples(session: Session, episodes: Sequence[ScoredEpisode], rewards_cfg: RewardsConfig,
                   edges: Sequence[float] | None = None,
                   ranks: dict[int, tuple[int, int]] | None = None, *,
                   decision_from: str = "all") -> list[Example]:
    """Chat examples for these episodes; an episode without any assistant turn has nothing to learn.
    Rank labels come from `ranks` (the whole offline set's, so a replayed episode keeps its item's group),
    or from these episodes when not given. With decision_from "correct" an episode whose direction did not
    come true keeps its label and turns but not its decision's loss (trainer.decision.leave_decision_out)."""
    msgs = episode_messages(session, episodes)
    if rewards_cfg.label_format == "rank" and ranks is None:
        ranks = item_ranks(episodes)
    out = []
    for ep in episodes:
        messages = msgs.get(ep.episode_id, [])
        if not any(m["role"] == "assistant" for m in messages):
            continue
        score = achieved_score(ep)
        label = (rank_label(*ranks.get(ep.episode_id, (0, 1)), rewards_cfg.quantile_bins)
                 if ranks is not None else training_label(score, rewards_cfg, edges))
        chat = relabel(messages, ep.conditioning, label, ep.episode_id)
        if not trains_decision(ep, decision_from):
            chat = leave_decision_out(chat)
        out.append(Example(ep.episode_id, ep.block_id, ep.prediction_id, score, label, chat))
    return out


def first_tool(messages: Sequence[dict[str, str]]) -> str | None:
    """The tool of the chat's first assistant turn, or None when that turn is not a tool call (it answered at
    once, or wrote something unparseable)."""
    for msg in messages:
        if msg["role"] == "assistant":
            found = TOOL_CALL.match(msg["content"].lstrip())
            return found.group(1) if found else None
    return None


@dataclass(frozen=True)
class LabelResearch:
    """How a round's labels relate to the research its examples did: `nats` is the plug-in mutual information
    between an example's label and its first tool call (0 when the label says nothing about it, ln(tools) at
    most), `first_tool` the counts behind it, label -> tool ("none": no tool call) -> examples.

    Why: a label can only steer what it carries information about. On the rank-labelled blocks of
    bench/results/learning_history.md the label carried 0.18 nats about reading the news in run O, whose
    adapter followed it (P(news first) 0.04 -> 0.65 across labels), and 0.08 in runs N and P, whose adapters
    did not move. Kept on the training run (`training_runs.hyperparams -> label_research`) so a round that
    cannot steer the research is visible before anyone waits for its held-out answers."""

    nats: float
    first_tool: dict[str, dict[str, int]]

    def record(self) -> dict:
        return {"nats": round(self.nats, 4), "first_tool": self.first_tool}


def label_information(pairs: Sequence[tuple[str, str]]) -> float:
    """Plug-in mutual information, in nats, between the first and second members of these pairs."""
    n = len(pairs)
    joint = Counter(pairs)
    left, right = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    return max(0.0, sum(c / n * math.log(c * n / (left[a] * right[b])) for (a, b), c in joint.items()))


def label_research(examples: Sequence[Example]) -> LabelResearch:
    """What these examples' labels say about their first tool call (copies count, as they train)."""
    pairs = [(e.label, first_tool(e.messages) or "none") for e in examples]
    table: dict[str, Counter] = {}
    for label, tool in pairs:
        table.setdefault(label, Counter())[tool] += 1
    return LabelResearch(label_information(pairs), {k: dict(sorted(v.items())) for k, v in sorted(table.items())})


def top_fraction(episodes: Sequence[ScoredEpisode], fraction: float) -> list[ScoredEpisode]:
    """Each block's best-scoring ceil(fraction * n) episodes (RAFT-style filtering); ties by episode id."""
    if fraction >= 1.0:
        return list(episodes)
    by_block: dict[int, list[ScoredEpisode]] = {}
    for e in episodes:
        by_block.setdefault(e.block_id, []).append(e)
    keep: set[int] = set()
    for eps in by_block.values():
        ranked = sorted(eps, key=lambda e: (-achieved_score(e), e.episode_id))
        keep.update(e.episode_id for e in ranked[: math.ceil(fraction * len(ranked))])
    return [e for e in episodes if e.episode_id in keep]


def boosted(episodes: Sequence[ScoredEpisode], fraction: float, passes: int) -> list[ScoredEpisode]:
    """The episodes, then `passes` extra copies of each block's top `fraction` (each under its own label).

    Why: with every direction explored at random, a model that ignores the label sees no link
    between a headline and the direction at all, because right and wrong calls are equally common;
    only the label x headline x direction interaction carries the signal, and a 135M model did not
    learn it in one round (bench/results/learning_curve.md). Repeating the top episodes gives the data a
    label-independent pull toward what scored well (as the filtered arm has), while the low-scored
    episodes stay in, labelled low, so the label still has something to steer."""
    if fraction <= 0 or passes <= 0:
        return list(episodes)
    top = top_fraction(episodes, fraction)
    return list(episodes) + top * passes


def balanced(episodes: Sequence[ScoredEpisode], bins: int = 4, *,
             counted: Callable[[ScoredEpisode], bool] | None = None) -> list[ScoredEpisode]:
    """The episodes, with copies added so that `up` and `down` are equally common within each score bin
    (quantile bins of the achieved score over these episodes); flat calls and parse failures as they are.

    Why: the achieved score of a direction carries the period's drift. When up-moves dominated the
    train weeks, high-scoring episodes are mostly `up`, and a small model learns "high score -> up"
    (label x direction) long before "high score -> the way the headline points" (label x headline x
    direction): run D in bench/results/learning_history.md wrote `up` 0.95 on every held-out item. With
    both directions equally common at every score level, the label says nothing about the direction by
    itself, and only the evidence in the context can. Copies go round-robin through the minority
    direction's episodes in id order (deterministic).

    `counted` picks the episodes whose direction is trained (with `trainer.decision_from = "correct"`, those that
    came true): only they are counted and copied. Counting every episode there would even out directions whose
    loss is 0 and leave the trained ones as skewed as the period's outcomes (run O: 116 right `down` against 62
    right `up`)."""
    if not episodes:
        return []
    scores = sorted(achieved_score(e) for e in episodes)
    edges = [scores[min(len(scores) - 1, (len(scores) * k) // bins)] for k in range(1, bins)]
    out = list(episodes)
    by_bin: dict[int, dict[str, list[ScoredEpisode]]] = {}
    for e in episodes:
        if e.direction in ("up", "down") and (counted is None or counted(e)):
            b = sum(achieved_score(e) >= edge for edge in edges)
            by_bin.setdefault(b, {"up": [], "down": []})[e.direction].append(e)
    for _, sides in sorted(by_bin.items()):
        few, many = sorted(sides.values(), key=len)
        if not few:
            continue  # one direction only in this bin: nothing to copy
        few = sorted(few, key=lambda e: e.episode_id)
        out += [few[i % len(few)] for i in range(len(many) - len(few))]
    return out


def replay_sample(older: Sequence[ScoredEpisode], size: int, seed: str) -> list[ScoredEpisode]:
    """A fixed-size, deterministic sample of already-trained episodes (same seed, same sample)."""
    pool = sorted(older, key=lambda e: e.episode_id)
    if len(pool) <= size:
        return pool
    return sorted(random.Random(seed).sample(pool, size), key=lambda e: e.episode_id)


def plan_round(session: Session, cfg: TrainerConfig, rewards_cfg: RewardsConfig, *,
               block_ids: Sequence[int] | None = None,
               replay_episode_ids: Sequence[int] | None = None) -> RoundPlan:
    """New = scored episodes of train blocks no finished run used; replay = a sample of the rest.

    Passing `block_ids`/`replay_episode_ids` rebuilds the exact data of an interrupted run.
    """
    everything = offline_set(session, cfg)
    pool = top_fraction(everything, cfg.filter_top_fraction)
    if not pool:
        raise TrainerError("no scored episodes in the offline set: run a block (`scoreloop block run`) and "
                           "resolve it (`scoreloop resolve`) before training")
    if block_ids is None:
        used = used_block_ids(session, cfg.objective)
        new_blocks = sorted({e.block_id for e in pool} - used)
    else:
        new_blocks = sorted(block_ids)
    new_set = set(new_blocks)
    new = [e for e in pool if e.block_id in new_set]
    older = [e for e in pool if e.block_id not in new_set]
    if replay_episode_ids is None:
        replay = replay_sample(older, cfg.replay_size, f"{cfg.seed}:{new_blocks}")
    else:
        wanted = set(replay_episode_ids)
        replay = [e for e in older if e.episode_id in wanted]
    ranks = item_ranks(everything) if rewards_cfg.label_format == "rank" else None
    scored_new = sum(e.block_id in new_set for e in everything)
    return RoundPlan(new_blocks, new, replay, label_edges(pool, rewards_cfg), len(pool), ranks, scored_new)


def export_jsonl(engine: Engine, trainer_cfg: TrainerConfig, rewards_cfg: RewardsConfig, out: str | Path) -> int:
    """Write the whole offline set as JSONL in chat `messages` format."""
    out = Path(out)
    with session_scope(engine) as s:
        pool = offline_set(s, trainer_cfg)
        if not pool:
            raise TrainerError("no scored episodes to export: run and resolve a block first")
        examples = build_examples(s, pool, rewards_cfg, label_edges(pool, rewards_cfg))  # rank: the pool's groups
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.record()) + "\n")
    tmp.replace(out)
    return len(examples)
