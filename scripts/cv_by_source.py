"""Cross-validated label figures beside the held-out ones: 3-fold CV by whole source over the external
training items (evals/data/external/train-*.jsonl), with our own training set always in training.

    .venv/bin/python scripts/cv_by_source.py
"""

from sklearn.metrics import cohen_kappa_score, f1_score
from sklearn.model_selection import GroupKFold

from bot.grader import CachedEmbeddings, Label, OfflineModel, load_training_set
from bot.knowledge import bundled_embeddings


def main() -> None:
    items = load_training_set()
    external = [i for i, item in enumerate(items) if item.source]
    own = [items[i] for i, item in enumerate(items) if not item.source]
    print(f"own items {len(own)}, external items {len(external)}")
    embeddings = CachedEmbeddings(bundled_embeddings())
    predicted: dict[int, Label] = {}
    folds = GroupKFold(n_splits=3).split(external, groups=[items[i].source for i in external])
    for train, test in folds:
        model = OfflineModel(embeddings).fit(own + [items[external[k]] for k in train])
        held_out = [external[k] for k in test]
        labels, _ = model.predict_proba([items[i].utterance for i in held_out], [items[i].context for i in held_out])
        predicted.update(zip(held_out, labels, strict=True))
    for lang in ("en", "zh"):
        idx = [i for i in external if items[i].lang == lang]
        gold = [items[i].label for i in idx]
        guess = [predicted[i] for i in idx]
        macro = f1_score(gold, guess, labels=sorted(set(gold)), average="macro")
        print(f"{lang}: n {len(idx)}, macro-F1 {macro:.3f}, kappa {cohen_kappa_score(gold, guess):.3f}")


if __name__ == "__main__":
    main()
