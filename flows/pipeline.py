"""The `char-rnn-pipeline` flow: ingest, encode, check, train, evaluate, compare, promote, publish (and
optionally build a Bento of the promoted model)."""

from pathlib import Path

from prefect import flow

import settings
from flows import tasks
from flows.params import DataDir, Folder
from flows.tasks import (
    NO_PICKLE,
    compare,
    current_model,
    encode,
    evaluate,
    ingest,
    learnt,
    preflight,
    promote,
    publish,
    train,
)
from model.config import ModelConfig as M
from model.config import TrainConfig as T
from model.config import default, like
from stages import promotion, training
from stages.records import CorpusInfo, CurrentModel, Decision
from stages.training import Learnt

# A warm start continues the promoted model: it trains `steps` times the share of the text that is new,
# within these bounds (stages.training.budget), so a little new text is learnt in a few hundred steps.
WARM_MIN, WARM_MAX = 300, 1000


@flow(name="char-rnn-pipeline", **NO_PICKLE)
def pipeline(
    data_dir: DataDir | None = None,
    steps: like(T, "steps") = default(T, "steps"),
    cell: like(M, "cell") = default(M, "cell"),
    hidden: like(M, "hidden") = default(M, "hidden"),
    layers: like(M, "layers") = default(M, "layers"),
    dropout: like(M, "dropout") = default(M, "dropout"),
    batch: like(T, "batch") = default(T, "batch"),
    seq: like(T, "seq") = default(T, "seq"),
    lr: like(T, "lr") = default(T, "lr"),
    checkpoint_every: like(T, "checkpoint_every") = default(T, "checkpoint_every"),
    seed: like(T, "seed") = default(T, "seed"),
    artifacts_root: Folder | None = None,
    only_if_changed: bool = False,
    warm_min_steps: like(T, "steps") = WARM_MIN,
    warm_max_steps: like(T, "steps") = WARM_MAX,
    build_bento: bool = False,
) -> Decision:
    """Train a character-level RNN on a folder of text and promote it if it beats the current model.

    Paths must resolve inside the allowed roots (the checkout's data/, CHAR_RNN_HOME, CHAR_RNN_DATA,
    CHAR_RNN_ALLOWED_ROOTS); relative ones are taken from the checkout.

    Args:
        data_dir: the corpus: a folder of UTF-8 .txt files, or one file (default: CHAR_RNN_DATA)
        steps: optimizer steps of a fresh model; the steps a model should have learnt in all
        cell: the recurrent cell: rnn (vanilla tanh), gru or lstm
        hidden: hidden units per layer
        layers: stacked layers
        dropout: dropout between layers
        batch: parallel sequences per step
        seq: characters per sequence (truncated BPTT length)
        lr: peak learning rate (warmup, then cosine decay)
        checkpoint_every: steps between checkpoints
        seed: random seed for initialisation and sampling
        artifacts_root: where run directories go (default: CHAR_RNN_RUNS, or CHAR_RNN_HOME/runs)
        only_if_changed: end at once if the promoted model was trained on this very corpus for at least
            `steps` steps (or a model trained on it was rolled back to the promoted one)
        warm_min_steps: the fewest steps a warm start trains (it trains `steps` times the share of new text)
        warm_max_steps: the most steps a warm start trains, unless the promoted model lacks more of `steps`
        build_bento: after a promotion, build a Bento of the promoted model (its version the model's)
    """
    s = settings.current()
    corpus = ingest(data_dir or s.data)
    current = current_model(s.bentoml_dir)
    known = learnt(current, s.bentoml_dir)
    if only_if_changed and (same := promotion.unchanged(current, corpus.fingerprint)):
        if not training.short_of(current, corpus.fingerprint, known, steps):
            return tasks.decided(same, trained=False)
    vocab = len(current.vocab) if current else 1
    shape = M(vocab_size=vocab, cell=cell, hidden=hidden, layers=layers, dropout=dropout)
    config = T(steps=steps, batch=batch, seq=seq, lr=lr, checkpoint_every=checkpoint_every, seed=seed)
    bounds = (warm_min_steps, warm_max_steps)
    root = artifacts_root or s.runs_dir
    decision = candidate(corpus, current, known, shape, config, bounds, root, only_if_changed)
    if build_bento and decision.promoted and decision.run_dir is not None:
        tasks.build_bento(decision.tag)
    return tasks.decided(decision)


def candidate(
    corpus: CorpusInfo,
    current: CurrentModel | None,
    known: Learnt,
    shape: M,
    asked: T,
    bounds: tuple[int, int],
    root: Path,
    only_if_changed: bool = False,
) -> Decision:
    """Train a candidate of `shape` for its budget, score it against `current`, promote it if it wins and
    publish what the run did (the pipeline's stages after ingest, inside its flow run). With
    `only_if_changed`, a run that was decided already and lost to `current` is not done again."""
    warm, why_not = promotion.warm_start(current, shape)
    budget = training.budget(asked, warm, corpus.chars, known, *bounds)
    config = asked.model_copy(update={"steps": budget.steps, "lr": budget.lr})
    data = encode(corpus, root, warm)
    preflight(data, [config], current)
    model = shape.model_copy(update={"vocab_size": len(data.vocab)})
    run_dir = root / training.run_name(corpus.fingerprint, model, config, warm.tag if warm else None)
    if only_if_changed and (done := promotion.tried(run_dir, current)):
        return done
    trained = train(data, run_dir, model, config, warm, why_not, budget)
    scored = evaluate(trained.checkpoint, data)
    against = compare(trained.checkpoint, current, data) if current else None
    decision = promote(trained, scored, against, data, run_dir, settings.current().bentoml_dir)
    publish(corpus, data, trained, scored, decision, budget.why)
    return decision
