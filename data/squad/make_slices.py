"""Cut the SQuAD v1.1 dev set into the QA demo's slices, by article (never by question).

    python data/squad/make_slices.py ../shared/data/squad/dev-v1.1.reconstructed.json

The 48 articles are shuffled with a fixed seed and dealt, in that order, to test, validation,
transfer and train until each slice holds its number of questions; the articles left over are
not used. Each slice is JSON Lines in Hugging Face's ``squad`` layout (id, title, context,
question, answers {text, answer_start}), compressed with xz; the transfer slice keeps no
answers (its questions are transfer text: only the teacher's start and end logits teach them).
"""

from __future__ import annotations

import json
import lzma
import sys
from pathlib import Path

import numpy as np

QUESTIONS = {"test": 600, "validation": 300, "transfer": 800, "train": 1300}  # at least this many each (2 CPU cores)
SEED = 0


def main(source: str) -> None:
    articles = json.loads(Path(source).read_text())["data"]
    order = np.random.default_rng(SEED).permutation(len(articles))
    slices, at = {name: [] for name in QUESTIONS}, 0
    for name, wanted in QUESTIONS.items():
        while sum(len(p["qas"]) for a in slices[name] for p in a["paragraphs"]) < wanted:
            slices[name].append(articles[order[at]])
            at += 1
    out = Path(__file__).parent
    for name, chosen in slices.items():
        rows = [
            {"id": qa["id"], "title": article["title"], "context": paragraph["context"], "question": qa["question"]}
            | ({} if name == "transfer" else {"answers": {"text": [a["text"] for a in qa["answers"]],
                                                           "answer_start": [a["answer_start"] for a in qa["answers"]]}})
            for article in chosen for paragraph in article["paragraphs"] for qa in paragraph["qas"]
        ]  # fmt: skip
        (out / f"{name}.jsonl.xz").write_bytes(lzma.compress("".join(json.dumps(r) + "\n" for r in rows).encode(),
                                                             preset=9 | lzma.PRESET_EXTREME))  # fmt: skip
        print(f"{name}: {len(chosen)} articles, {len(rows)} questions: {', '.join(a['title'] for a in chosen)}")


if __name__ == "__main__":
    main(sys.argv[1])
