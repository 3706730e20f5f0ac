"""Tasks against hand-computed cases: word-tag alignment, QA windows and answers, entity scores
(conlleval rules), SQuAD exact match and F1."""

import numpy as np
import pytest
from transformers import BertTokenizer

from pipeline.errors import DataError
from pipeline.tasks.question_answering import (
    NO_ANSWER,
    answer_f1,
    best_answers,
    features,
    normalize_answer,
    squad_scores,
)
from pipeline.tasks.token_classification import (
    IGNORED,
    align_tags,
    check_tag_names,
    entity_scores,
    entity_spans,
    word_tags,
)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "where", "is", "the", "big", "apple", "new", "york", "city",
         ".", "play", "##ing"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer(vocab={word: i for i, word in enumerate(WORDS)})  # "playing" is play ##ing


def test_a_words_tag_goes_on_its_first_sub_token_and_truncated_words_have_none(tokenizer):
    sentences = [["new", "york", "is", "playing"], ["is", "playing"]]
    ids, labels, starts = align_tags(tokenizer, sentences, [np.array([1, 2, 0, 3]), None], max_length=16)
    assert tokenizer.convert_ids_to_tokens(ids[0]) == ["[CLS]", "new", "york", "is", "play", "##ing", "[SEP]"]
    assert labels[0].tolist() == [IGNORED, 1, 2, 0, 3, IGNORED, IGNORED]  # ##ing and the special tokens: none
    assert starts[0].tolist() == [1, 2, 3, 4]
    assert labels[1].tolist() == [IGNORED] * 5  # unlabeled: transfer text
    ids, labels, starts = align_tags(tokenizer, sentences[:1], [np.array([1, 2, 0, 3])], max_length=4)
    assert labels[0].tolist() == [IGNORED, 1, 2, IGNORED] and starts[0].tolist() == [1, 2, -1, -1]
    predicted = word_tags(np.array([0, 1, 2, 0]), starts[0], outside=0)
    assert predicted.tolist() == [1, 2, 0, 0]  # the cut-off words are predicted O


def test_long_contexts_become_overlapping_windows_with_the_answers_tokens(tokenizer):
    question, context = "where is the big apple", "the big apple is new york city ."
    feats = features(tokenizer, [question, question], [context, context], [(17, "new york"), None], max_length=12,
                     doc_stride=2)  # fmt: skip
    # 4 context tokens fit beside the question; windows overlap by 2: tokens 0-3, 2-5, 4-7 of the context
    assert feats.question.tolist() == [0, 0, 0, 1, 1, 1]
    assert [tokenizer.convert_ids_to_tokens(ids)[7:11] for ids in feats.input_ids[:3]] == [
        ["the", "big", "apple", "is"], ["apple", "is", "new", "york"], ["new", "york", "city", "."]]  # fmt: skip
    assert feats.offsets[1][:, 0].tolist() == [-1] * 7 + [8, 14, 17, 21, -1]  # character starts, context only
    assert feats.start.tolist() == [0, 9, 7] + [NO_ANSWER] * 3  # window 0 lacks the answer: [CLS]
    assert feats.end.tolist() == [0, 10, 8] + [NO_ANSWER] * 3
    with pytest.raises(DataError, match="question 0 has 5 tokens: with max_length 10 and doc_stride 2 no context"):
        features(tokenizer, [question], [context], [None], max_length=10, doc_stride=2)


def test_the_answer_is_the_best_valid_span_over_a_questions_windows(tokenizer):
    question, context = "where is the big apple", "the big apple is new york city ."
    feats = features(tokenizer, [question], [context], [None], max_length=12, doc_stride=2)
    start, end = [np.zeros(12) for _ in feats.input_ids], [np.zeros(12) for _ in feats.input_ids]
    start[0][1], end[0][1] = 50.0, 50.0  # the highest logits, in the question: never an answer
    start[1][9], end[1][10] = 4.0, 4.0  # "new york" in window 1: 8
    start[2][7], end[2][9] = 3.0, 4.5  # "new york city" in window 2: 7.5

    def answers(**options):
        logits = [np.stack([s, e], axis=-1) for s, e in zip(start, end, strict=True)]
        return best_answers(logits, feats.offsets, feats.question, [context], **options)

    assert answers() == ["new york"]
    start[2][7] = 3.6  # now 8.1
    assert answers() == ["new york city"]
    assert answers(max_answer_length=2) == ["new york"]  # 3 tokens: too long
    end[2][:] = -1.0
    end[2][7], start[2][8] = 9.0, 9.0  # the end before the start: not a span
    assert answers(n_best=1) == ["new york"]


@pytest.mark.parametrize(
    ("tags", "spans"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
        (["O", "I-PER", "I-PER"], {("PER", 1, 2)}),  # an I- after O begins an entity (conlleval)
        (["B-PER", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 1)}),  # the type changes: two entities
        (["B-PER", "B-PER", "I-PER"], {("PER", 0, 0), ("PER", 1, 2)}),  # B- always begins one
        (["I-PER"], {("PER", 0, 0)}),  # an entity that runs to the end is closed there
        (["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "E-ORG"], {("PER", 0, 0), ("LOC", 1, 3), ("ORG", 5, 5)}),
        (["B-PER", "E-PER", "I-PER"], {("PER", 0, 1), ("PER", 2, 2)}),  # E- ends one; the I- after begins another
        (["O", "O"], set()),
    ],
)
def test_entity_spans_follow_the_conlleval_chunk_rules(tags, spans):
    assert entity_spans(tags) == spans


def test_entity_scores_count_an_entity_only_with_its_exact_span_and_type():
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    predicted = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_scores(gold, predicted)  # seqeval's README example: F1 0.50
    assert scores["entity_precision"] == scores["entity_recall"] == scores["entity_f1"] == 0.5
    assert scores["token_accuracy"] == pytest.approx(8 / 10)  # words 2 and 3 of the first sequence differ
    scores = entity_scores([["B-PER", "I-PER", "O", "B-LOC"]], [["B-LOC", "I-LOC", "O", "B-LOC"]])
    assert (scores["entity_precision"], scores["entity_recall"]) == (0.5, 0.5)  # PER found as LOC: a miss
    scores = entity_scores([["B-PER", "O"]], [["B-PER", "B-LOC"]])
    assert (scores["entity_precision"], scores["entity_recall"]) == (0.5, 1.0)
    assert scores["entity_f1"] == pytest.approx(2 / 3)
    assert entity_scores([["O"]], [["O"]])["entity_f1"] == 0.0  # no entity at all: nothing found
    with pytest.raises(ValueError, match="pair up word for word"):
        entity_scores([["O", "O"]], [["O"]])


def test_tag_names_must_be_bio_or_bioes():
    assert check_tag_names(["O", "B-person", "I-person", "E-person", "S-person"]) is None
    assert "['PER', 'X-loc', 'B-']" in check_tag_names(["O", "PER", "X-loc", "B-"])


def test_squad_normalization_exact_match_and_f1_as_the_official_script():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a theory") == "apple theory"  # articles only as whole words
    assert answer_f1("Denver Broncos", "the Broncos") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert answer_f1("Broncos Broncos", "Broncos") == pytest.approx(2 / 3)  # words counted with multiplicity
    assert answer_f1("Carolina", "Denver") == 0.0
    answers = {"q1": ["Denver Broncos", "The Denver Broncos"], "q2": ["Santa Clara, California"], "q3": ["1"]}
    scores = squad_scores({"q1": "the denver broncos.", "q2": "Santa Clara"}, answers)  # q3 unanswered: 0
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 0.8) / 3)  # q2: precision 1, recall 2/3
